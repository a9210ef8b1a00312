"""Time, phases and per-phase settings (stackwise.training.schedule)."""

import itertools
import json
import math

import pytest

from stackwise.config import ConfigError, LrSchedule, OptimizerConfig, Ramp, StackWiseConfig
from stackwise.training.schedule import (
    Phase,
    PhaseSchedule,
    TimeController,
    lr_at,
    resolve_data,
    resolve_optimizer,
)


def make_config(schedule=None, **training):
    data = {
        "model": {"vocab_size": 64, "d_model": 16, "n_heads": 2},
        "training": {"batch_size": 4, "seq_len": 32, **training},
        "data": {"use_dummy_data": True, "mask_rate": 0.2},
    }
    if schedule is not None:
        data["schedule"] = schedule
    return StackWiseConfig.from_dict(data)


def two_phases(boundary=0.3):
    return PhaseSchedule([Phase("a", 0.0, boundary), Phase("b", boundary, 1.0)])


# ---- validation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("bounds", "path", "words"),
    [
        ([(0.0, 0.4), (0.5, 1.0)], "schedule.1.start_t", "gap"),
        ([(0.0, 0.6), (0.5, 1.0)], "schedule.1.start_t", "overlaps"),
        ([(0.0, 0.5), (0.5, 0.9)], "schedule.1.end_t", "end at t=1"),
        ([(0.1, 0.5), (0.5, 1.0)], "schedule.0.start_t", "gap"),
        ([(0.5, 1.0), (0.0, 0.5)], "schedule.1.start_t", "time order"),
    ],
)
def test_schedule_must_tile_the_run(bounds, path, words):
    phases = [Phase(f"p{i}", s, e) for i, (s, e) in enumerate(bounds)]
    with pytest.raises(ConfigError) as err:
        PhaseSchedule(phases)
    assert path in err.value.paths
    assert words in str(err.value)


def test_schedule_rejects_duplicate_names_and_empty_list():
    with pytest.raises(ConfigError) as err:
        PhaseSchedule([Phase("x", 0.0, 0.5), Phase("x", 0.5, 1.0)])
    assert "schedule.1.name" in err.value.paths
    with pytest.raises(ConfigError):
        PhaseSchedule([])


def test_phase_checks_its_own_bounds_and_task():
    with pytest.raises(ConfigError) as err:
        Phase("p", 0.5, 0.5)
    assert err.value.paths == ["end_t"]
    with pytest.raises(ConfigError) as err:
        Phase("p", 0.0, 1.5)
    assert "end_t" in err.value.paths
    with pytest.raises(ConfigError) as err:
        Phase("p", 0.0, 1.0, task="mlm", data={"objective": "clm"})
    assert err.value.paths == ["task"]


def test_from_dict_names_the_bad_phase_field():
    data = two_phases().to_dict()
    data["phases"][1]["end_t"] = 0.2
    with pytest.raises(ConfigError) as err:
        PhaseSchedule.from_dict(data)
    assert "schedule.1.end_t" in err.value.paths
    data = two_phases().to_dict()
    data["phases"][0]["data"]["seq_len"] = 1
    with pytest.raises(ConfigError) as err:
        PhaseSchedule.from_dict(data)
    assert "schedule.0.data.seq_len" in err.value.paths


# ---- lookup ----------------------------------------------------------------------------------


def test_at_boundaries_belong_to_the_new_phase_and_one_to_the_last():
    s = PhaseSchedule([Phase("a", 0.0, 0.3), Phase("b", 0.3, 0.7), Phase("c", 0.7, 1.0)])
    assert s.at(0.0).name == "a"
    assert s.at(math.nextafter(0.3, 0.0)).name == "a"
    assert s.at(0.3).name == "b"
    assert s.at(0.7).name == "c"
    assert s.at(1.0).name == "c"
    assert s.index_at(0.5) == 1
    with pytest.raises(ValueError):
        s.at(1.0000001)
    with pytest.raises(ValueError):
        s.at(-0.1)
    assert s.transitions == [(0.3, "a", "b"), (0.7, "b", "c")]


def test_step_phases_convert_exactly():
    cfg = make_config([
        {"name": "a", "start_step": 0, "end_step": 3},
        {"name": "b", "start_step": 3, "end_step": 10},
    ])
    s = PhaseSchedule.from_config(cfg, total_steps=10)
    assert s.transitions == [(0.3, "a", "b")]
    assert s.transition_steps(10) == [(3, 0.3, "a", "b")]
    assert s.step_ranges(10) == [(0, 3), (3, 10)]
    assert [s.phase_at_step(k, 10).name for k in range(10)] == ["a"] * 3 + ["b"] * 7
    assert s[0].local_time(0.15) == pytest.approx(0.5)


def test_step_phases_must_tile_the_given_run_length():
    cfg = make_config([
        {"name": "a", "start_step": 0, "end_step": 3},
        {"name": "b", "start_step": 3, "end_step": 12},
    ])
    with pytest.raises(ConfigError) as err:
        PhaseSchedule.from_config(cfg, total_steps=10)
    assert "schedule.1.end_step" in err.value.paths
    assert PhaseSchedule.from_config(cfg, total_steps=12).step_ranges(12) == [(0, 3), (3, 12)]


def test_mixed_forms_share_one_boundary():
    cfg = make_config([{"name": "a", "start_t": 0.0, "end_t": 0.3}, {"name": "b", "start_step": 3, "end_step": 10}])
    s = PhaseSchedule.from_config(cfg, total_steps=10)
    assert s[0].end_t == s[1].start_t == 0.3
    assert s.transition_steps(10) == [(3, 0.3, "a", "b")]


def test_boundary_between_steps_starts_on_the_next_step():
    s = two_phases(0.35)
    assert s.transition_steps(10) == [(4, 0.4, "a", "b")]
    assert s.phase_at_step(3, 10).name == "a"
    assert s.phase_at_step(4, 10).name == "b"


def test_steps_are_covered_once_and_agree_with_at():
    # 0.07 · 100 and 0.57 · 100 land within float noise of a step.
    s = PhaseSchedule([Phase("a", 0.0, 0.07), Phase("b", 0.07, 0.35), Phase("c", 0.35, 0.57), Phase("d", 0.57, 1.0)])
    for n in (10, 20, 37, 100, 1000):
        ranges = s.step_ranges(n)
        assert ranges[0][0] == 0 and ranges[-1][1] == n
        assert all(r[1] == nxt[0] for r, nxt in itertools.pairwise(ranges))
        for k in range(n):
            assert s.phase_at_step(k, n) is s.at(k / n), (n, k)


def test_phase_too_short_for_the_run_is_an_error():
    s = PhaseSchedule([Phase("a", 0.0, 0.51), Phase("tiny", 0.51, 0.58), Phase("c", 0.58, 1.0)])
    with pytest.raises(ConfigError) as err:
        s.check_steps(10)
    assert err.value.paths == ["schedule.1.end_t"]
    assert "'tiny'" in str(err.value) and "total_steps >= 15" in str(err.value)
    s.check_steps(15)  # the promised length works
    cfg = make_config([
        {"name": "a", "start_t": 0.0, "end_t": 0.51},
        {"name": "tiny", "start_t": 0.51, "end_t": 0.58},
        {"name": "c", "start_t": 0.58, "end_t": 1.0},
    ])
    with pytest.raises(ConfigError):
        PhaseSchedule.from_config(cfg, total_steps=10)


def test_no_schedule_gives_one_phase():
    s = PhaseSchedule.from_config(make_config(), total_steps=5)
    assert len(s) == 1 and s[0].name == "main" and (s[0].start_t, s[0].end_t) == (0.0, 1.0)
    assert s.transitions == [] and s.step_ranges(5) == [(0, 5)]
    named = PhaseSchedule.single_phase("pre", task="mlm")
    assert named[0].name == "pre" and named[0].task == "mlm"


# ---- time ------------------------------------------------------------------------------------


def test_time_controller_off_by_one_rules():
    tc = TimeController(10)
    assert tc.t == 0.0 and tc.t(0) == 0.0 and tc.t(3) == 0.3 and tc.t(10) == 1.0
    assert tc.step_at(0.3) == 3
    assert TimeController(100).step_at(0.07) == 7  # 0.07 * 100 is 7.000000000000001 in floats
    assert TimeController(100).step_at(0.57) == 57  # and 0.57 * 100 is 56.99999999999999
    assert tc.step_at(0.35) == 4 and tc.step_at(0.0) == 0 and tc.step_at(1.0) == 10
    assert TimeController(3).step_at(1 / 3) == 1
    seen = []
    while not tc.done:
        seen.append((tc.step, tc.t))
        tc.advance()
    assert seen == [(k, k / 10) for k in range(10)]
    assert tc.remaining == 0 and tc.step == 10
    with pytest.raises(RuntimeError):
        tc.advance()
    with pytest.raises(ValueError):
        tc.t(11)


def test_time_controller_state_round_trip():
    tc = TimeController(8, step=5)
    assert tc.remaining == 3 and tc.t == 5 / 8
    other = TimeController(8)
    other.load_state_dict(tc.state_dict())
    assert other.step == 5
    with pytest.raises(ValueError):
        TimeController(9).load_state_dict(tc.state_dict())
    assert json.loads(json.dumps({"t": tc.t})) == {"t": 0.625}


# ---- lr shapes (formulas written out independently of LrSchedule.at) ---------------------------

PEAK, FINAL, WARM = 1e-3, 1e-4, 0.1


@pytest.mark.parametrize(
    ("shape", "tau", "expected"),
    [
        ("cosine", 0.0, 0.0),
        ("cosine", WARM / 2, PEAK / 2),
        ("cosine", WARM, PEAK),
        ("cosine", WARM + (1 - WARM) / 2, (PEAK + FINAL) / 2),
        ("cosine", WARM + (1 - WARM) / 4, FINAL + (PEAK - FINAL) * (1 + math.cos(math.pi / 4)) / 2),
        ("cosine", 1.0, FINAL),
        ("linear", WARM + (1 - WARM) / 2, (PEAK + FINAL) / 2),
        ("linear", WARM + 0.75 * (1 - WARM), PEAK - 0.75 * (PEAK - FINAL)),
        ("linear", 1.0, FINAL),
        ("constant", WARM / 4, PEAK / 4),
        ("constant", 0.9, PEAK),
    ],
)
def test_lr_shapes(shape, tau, expected):
    lr = LrSchedule(schedule=shape, peak=PEAK, final=FINAL, warmup=WARM)
    assert lr_at(lr, tau) == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_lr_without_warmup_and_plain_number():
    lr = LrSchedule(schedule="cosine", peak=2.0, final=0.0)
    assert lr_at(lr, 0.0) == 2.0 and lr_at(lr, 0.5) == pytest.approx(1.0)
    assert lr_at(3e-4, 0.7) == 3e-4


# ---- settings resolution -----------------------------------------------------------------------


def test_resolve_optimizer_overrides_only_given_fields():
    base = OptimizerConfig(optimizer_type="AdamW", lr=1e-4, weight_decay=0.1, lr_scale={"a.*": 0.5})
    phase = Phase("p", 0.0, 1.0, optimizer={"optimizer_type": "SGD", "lr": {"peak": 1e-3}, "lr_scale": {"b.*": 2.0}})
    out = resolve_optimizer(base, phase)
    assert out.optimizer_type == "SGD" and isinstance(out.lr, LrSchedule) and out.lr.peak == 1e-3
    assert out.weight_decay == 0.1 and out.betas == base.betas
    assert out.lr_scale == {"b.*": 2.0}  # replaced, not merged
    assert resolve_optimizer(base, Phase("q", 0.0, 1.0)) == base


def test_resolve_data_precedence_and_ramps():
    cfg = make_config()
    plain = resolve_data(cfg, Phase("p", 0.0, 1.0))
    assert plain == {
        "objective": "clm", "seq_len": 32, "batch_size": 4, "mask_rate": 0.2,
        "mask_range": (0.02, 1.0), "paths": [], "text_field": "text",
    }
    phase = Phase("p", 0.0, 1.0, data={"objective": "mlm", "seq_len": 16, "mask_rate": {"start": 0.1, "end": 0.5}})
    out = resolve_data(cfg, phase, tau=0.5)
    assert out["objective"] == "mlm" and out["seq_len"] == 16 and out["batch_size"] == 4
    assert out["mask_rate"] == pytest.approx(0.3)
    assert resolve_data(cfg, phase, tau=None)["mask_rate"] == Ramp(start=0.1, end=0.5)
    assert resolve_data(cfg, Phase("p", 0.0, 1.0, task="diffusion"))["objective"] == "diffusion"


# ---- round trips -----------------------------------------------------------------------------


def test_phase_and_schedule_round_trip_exactly():
    rich = Phase(
        "grow", 0.25, 1.0, task="mlm",
        data={"mask_rate": Ramp(start=0.1, end=0.4, shape="cosine"), "mask_range": (0.1, 0.9), "seq_len": 64},
        model={"grow": {"n": 1, "where": "prepend", "init": "identity"}, "trainable": "last:1", "stack_precision": {0: "bf16"}},
        optimizer={"lr": LrSchedule(peak=3e-4, final=3e-5, warmup=0.05), "betas": (0.9, 0.99)},
    )
    assert Phase.from_dict(rich.to_dict()) == rich
    s = PhaseSchedule([Phase("warm", 0.0, 0.25), rich])
    assert PhaseSchedule.from_dict(s.to_dict()) == s
    assert PhaseSchedule.from_dict(json.loads(json.dumps(s.to_dict()))) == s
    assert PhaseSchedule.from_dict(s.to_dict()).to_dict() == s.to_dict()
    with pytest.raises(ConfigError):
        Phase.from_dict({**rich.to_dict(), "colour": "red"})
