"""Time in tokens and epochs (docs/schedule.md, "Time in tokens and epochs"): the run length and
phase bounds convert exactly to steps. Every expected step below is worked out by hand from the
formulas: tokens per step = batch_size × seq_len; windows per epoch W = train tokens // (seq_len + 1);
a bound lands on the first step at which the cumulative clock reaches it (rounded up)."""

import json
import math
from fractions import Fraction

import pytest
import yaml

from stackwise.cli import main
from stackwise.cli.plan import plan_rows
from stackwise.config import ConfigError, StackWiseConfig
from stackwise.data.dummy import N_TRAIN_TOKENS
from stackwise.time_units import parse_token_count
from stackwise.training import TrainingMachine
from stackwise.training.loader import ProgressiveDataLoader
from stackwise.training.schedule import PhaseSchedule, resolve_time

TINY = {"d_model": 32, "n_heads": 2, "max_seq_len": 64, "architecture": {"n_stacks": 1, "blocks_per_stack": 1}}


def config(training=None, schedule=None, data=None, **sections):
    body = {"model": dict(TINY), "training": {"batch_size": 4, "seq_len": 32, "optimizer": {"lr": 2e-3}, **(training or {})},
            "data": data if data is not None else {"use_dummy_data": True}, **sections}
    if schedule is not None:
        body["schedule"] = schedule
    return body


def steps_of(cfg, *args):
    converted = StackWiseConfig.from_dict(cfg).in_steps(*args)
    return converted.training.total_steps, [(p.start_step, p.end_step) for p in converted.schedule or []]


def problems(cfg, *args):
    with pytest.raises(ConfigError) as err:
        StackWiseConfig.from_dict(cfg).in_steps(*args)
    return err.value


# ---- token counts as written ----------------------------------------------------------------


@pytest.mark.parametrize(("written", "count"), [
    (1280, 1280), ("1280", 1280), ("50M", 50_000_000), ("1.5B", 1_500_000_000), ("1.5k", 1500),
    ("2_000_000", 2_000_000), ("1e6", 1_000_000), (1.5e9, 1_500_000_000), ("3T", 3 * 10**12), (" 7 M ", 7_000_000),
])
def test_token_counts_parse_exactly(written, count):
    assert parse_token_count(written) == count


@pytest.mark.parametrize("bad", ["5Q", "1.5", "", "M", "-5", "1/2", "50MB", True, None, [1], float("inf")])
def test_bad_token_counts_are_refused(bad):
    with pytest.raises(ValueError):
        parse_token_count(bad)


# ---- run lengths and phases in tokens ----------------------------------------------------------


def test_total_tokens_converts_with_tokens_per_step():
    per_step = 4 * 32  # batch × seq_len = 128
    assert steps_of(config({"total_tokens": "1280"}))[0] == 1280 // per_step == 10
    assert steps_of(config({"total_tokens": 1300}))[0] == math.ceil(1300 / per_step) == 11  # not on a step: up
    assert steps_of(config({"total_tokens": "1.5M"}))[0] == math.ceil(1_500_000 / per_step) == 11719
    # an explicit run length (TrainingMachine(total_steps=N), --steps N) replaces the config's
    assert steps_of(config({"total_tokens": "1280"}), 7)[0] == 7


def test_token_phases_convert_piecewise_with_each_phase_batch():
    cfg = config({"total_tokens": "1.5K"}, [
        {"name": "a", "start_tokens": 0, "end_tokens": 640},
        {"name": "b", "start_tokens": 640, "end_tokens": "1.5K", "data_config": {"batch_size": 8}},
    ])
    a_end = 640 // (4 * 32)  # 5 steps of 128 tokens
    b_end = a_end + math.ceil((1500 - 640) / (8 * 32))  # then 256 per step: 860 / 256 = 3.36 -> 4
    assert steps_of(cfg) == (b_end, [(0, a_end), (a_end, b_end)]) == (9, [(0, 5), (5, 9)])
    converted = StackWiseConfig.from_dict(cfg).in_steps()
    assert converted.training.total_tokens is None and converted.schedule[1].start_tokens is None
    # the converted config says what was written, and reloads as itself
    text = converted.to_yaml()
    assert text.startswith("# time as written") and "training.total_tokens: 1500  ->  training.total_steps: 9" in text
    assert StackWiseConfig.from_dict(yaml.safe_load(text)).to_dict() == converted.to_dict()


def test_a_bound_off_a_step_rounds_up_to_the_next_step():
    cfg = config({"total_steps": 20}, [
        {"name": "a", "start_tokens": 0, "end_tokens": 1000},  # 1000 / 128 = 7.8 -> step 8
        {"name": "b", "start_step": 8, "end_step": 20},
    ])
    assert steps_of(cfg) == (20, [(0, 8), (8, 20)])
    # starting the next phase at step 7 overlaps: the first phase holds steps 0..7
    cfg["schedule"][1]["start_step"] = 7
    err = problems(cfg)
    assert err.paths == ["schedule.1.start_step"] and "overlaps" in str(err) and "step 8" in str(err)


def test_t_phases_follow_a_token_length_when_every_phase_has_one_rate():
    cfg = config({"total_tokens": 2560}, [{"name": "a", "start_t": 0, "end_t": 0.35}, {"name": "b", "start_t": 0.35, "end_t": 1}])
    n = 2560 // 128  # 20 steps; t = 0.35 -> ceil(0.35 · 20) = step 7
    assert steps_of(cfg) == (n, [(0, 7), (7, 20)])
    cfg["schedule"][1]["data_config"] = {"batch_size": 8}  # two rates: a fraction of the run is no fixed step
    with pytest.raises(ConfigError) as err:
        StackWiseConfig.from_dict(cfg)
    assert err.value.paths == ["schedule.0.end_t"]


# ---- epochs: windows of the training split ------------------------------------------------------


def test_epochs_convert_with_each_phase_windows():
    """Dummy data: N_TRAIN_TOKENS training tokens. seq_len 32 cuts W = N // 33 windows; seq_len 64
    cuts N // 65. Each step of batch 4 advances the epoch clock by 4 / W."""
    cfg = config({"total_epochs": 0.003}, [
        {"name": "a", "start_epoch": 0, "end_epoch": 0.001},
        {"name": "b", "start_epoch": 0.001, "end_epoch": 0.003, "data_config": {"seq_len": 64}},
    ])
    w_a, w_b = N_TRAIN_TOKENS // 33, N_TRAIN_TOKENS // 65
    a_end = math.ceil(Fraction(1, 1000) * w_a / 4)  # 7.94 -> 8
    clock = Fraction(a_end * 4, w_a)  # epochs run when phase a ends (a little past 0.001)
    b_end = a_end + math.ceil((Fraction(3, 1000) - clock) * w_b / 4)
    parsed = StackWiseConfig.from_dict(cfg)
    loader = ProgressiveDataLoader(parsed)
    assert loader.n_train_tokens == N_TRAIN_TOKENS
    converted = resolve_time(parsed, data=loader)
    assert converted.training.total_steps == b_end
    assert [(p.start_step, p.end_step) for p in converted.schedule] == [(0, a_end), (a_end, b_end)]
    # the same when the machine reads the corpus itself
    assert resolve_time(parsed).training.total_steps == b_end
    # one run length in epochs, no schedule: ceil(E · W / batch)
    assert steps_of(config({"total_epochs": 0.5}), None, N_TRAIN_TOKENS)[0] == math.ceil(Fraction(1, 2) * w_a / 4)


def test_a_one_epoch_phase_sees_every_window_once():
    """seq_len 1023: W = 2^20 // 1024 = 1024 windows, batch 8 -> one epoch is exactly 128 steps."""
    cfg = config({"batch_size": 8, "seq_len": 1023, "total_epochs": 2},
                 [{"name": "one", "start_epoch": 0, "end_epoch": 1}, {"name": "two", "start_epoch": 1, "end_epoch": 2}],
                 model={**TINY, "max_seq_len": 1024})
    parsed = StackWiseConfig.from_dict(cfg)
    loader = ProgressiveDataLoader(parsed)
    w = N_TRAIN_TOKENS // 1024
    converted = resolve_time(parsed, data=loader)
    assert [(p.start_step, p.end_step) for p in converted.schedule] == [(0, w // 8), (w // 8, 2 * w // 8)]
    for index, (first, end) in enumerate([(0, 128), (128, 256)]):
        loader.configure(phase_index=index)
        seen = [int(i) for step in range(first, end) for i in loader.batch_at(step, phase_start_step=first).sample_ids]
        assert sorted(seen) == list(range(w))  # every window exactly once


def test_epochs_need_the_corpus():
    cfg = config({"total_epochs": 1})
    err = problems(cfg)
    assert err.paths == ["training.total_epochs"] and "corpus" in str(err)
    with pytest.raises(ConfigError) as err:  # your own data that cannot say how many tokens it holds
        TrainingMachine(cfg, run_dir=False, data=iter([]), console=False)
    assert err.value.paths == ["training.total_epochs"] and "n_train_tokens" in str(err.value)


# ---- errors name the field ---------------------------------------------------------------------


@pytest.mark.parametrize(("training", "schedule", "path", "words"), [
    ({"total_tokens": 1280}, [{"name": "a", "start_tokens": 0, "end_t": 1.0}], "schedule.0.end_t", "one form"),
    ({"total_tokens": 1280}, [{"name": "a"}], "schedule.0.end_t", "needs its bounds"),
    ({"total_tokens": 1280}, [{"name": "a", "start_tokens": 0}], "schedule.0.end_tokens", "go together"),
    ({"total_tokens": 1280}, [{"name": "a", "start_epoch": 1, "end_epoch": 0.5}], "schedule.0.end_epoch", "greater"),
    ({"total_tokens": 1280}, [{"name": "a", "start_tokens": 0, "end_tokens": 700},
                              {"name": "b", "start_tokens": 640, "end_tokens": 1280}], "schedule.1.start_tokens", "overlaps"),
    ({"total_tokens": 1280}, [{"name": "a", "start_tokens": 0, "end_tokens": 640},
                              {"name": "b", "start_tokens": 700, "end_tokens": 1280}], "schedule.1.start_tokens", "gap"),
    ({"total_tokens": 1280}, [{"name": "a", "start_tokens": 128, "end_tokens": 1280}], "schedule.0.start_tokens", "gap"),
    ({"total_tokens": 1280}, [{"name": "a", "start_tokens": 0, "end_tokens": 1200}], "schedule.0.end_tokens", "end of the run"),
    ({"total_tokens": 1280}, [{"name": "a", "start_tokens": 0, "end_tokens": 1000},
                              {"name": "b", "start_tokens": 1000, "end_tokens": 1020},
                              {"name": "c", "start_tokens": 1020, "end_tokens": 1280}], "schedule.1.end_tokens", "no step"),
    ({"total_tokens": "5Q"}, None, "training.total_tokens", "not a token count"),
    ({"total_tokens": 1280, "total_steps": 10}, None, "training.total_tokens", "once"),
    ({"total_epochs": 0}, None, "training.total_epochs", "greater than 0"),
    ({"total_tokens": 1280}, [{"name": "a", "start_tokens": 0, "end_tokens": "1.2.3"}], "schedule.0.end_tokens", "token count"),
])
def test_bad_time_is_a_config_error_naming_the_field(training, schedule, path, words):
    with pytest.raises(ConfigError) as err:
        StackWiseConfig.from_dict(config(training, schedule)).in_steps()
    assert path in err.value.paths and words in str(err.value), str(err.value)


def test_no_run_length_keeps_the_clear_error():
    err = problems(config({}, [{"name": "a", "start_tokens": 0, "end_tokens": 1280}]))
    assert err.paths == ["training.total_steps"] and "the run length is not set" in str(err)


# ---- plan shows all four units -------------------------------------------------------------------


def test_plan_shows_steps_t_tokens_and_epochs_for_every_phase(tmp_path, capsys):
    cfg = config({"total_tokens": "1.5K"}, [
        {"name": "a", "start_tokens": 0, "end_tokens": 640},
        {"name": "b", "start_tokens": 640, "end_tokens": "1.5K", "data_config": {"batch_size": 8}},
    ])
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["plan", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    assert header[:5] == ["phase", "t", "steps", "tokens", "epochs"]
    rows = {line.split()[0]: dict(zip(header[:5], line.split()[:5], strict=True)) for line in lines[2:]}
    w = N_TRAIN_TOKENS // 33
    assert rows["a"] == {"phase": "a", "t": "0.000-0.556", "steps": "0-5", "tokens": "0-640",
                         "epochs": f"0-{5 * 4 / w:.4g}"}
    # phase b: 4 steps of 8 × 32 = 1024 tokens, ending at 640 + 1024 = 1664 (past 1,500: rounded up)
    assert rows["b"] == {"phase": "b", "t": "0.556-1.000", "steps": "5-9", "tokens": "640-1664",
                         "epochs": f"{5 * 4 / w:.4g}-{(5 * 4 + 4 * 8) / w:.4g}"}
    exact = plan_rows(StackWiseConfig.from_dict(cfg), train_tokens=N_TRAIN_TOKENS)[1]["time"]
    assert exact == {"steps": (5, 9), "tokens": (640, 1664), "epochs": (Fraction(20, w), Fraction(52, w))}
    # without the corpus the epochs are unknown; epochs given then are an error saying so
    assert main(["plan", str(path), "--no-data"]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[4] == "-"
    assert main(["plan", str(path), "--no-data", "training.total_tokens=null", "training.total_epochs=0.001",
                 'schedule=[{"name": "a", "start_epoch": 0, "end_epoch": 0.001}]']) == 2
    err = capsys.readouterr().err
    assert "training.total_epochs" in err and "--no-data" in err and "Traceback" not in err


def test_cli_refuses_bad_units_with_one_message(tmp_path, capsys):
    path = tmp_path / "tokens.yaml"
    path.write_text(yaml.safe_dump(config({"total_tokens": 1280})))
    for command in ("plan", "train"):
        assert main([command, str(path), "training.total_tokens=5Q"]) == 2
        err = capsys.readouterr().err
        assert err.count("training.total_tokens") == 1 and "5Q" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()


# ---- a run in tokens: trains, records, resumes and extends exactly --------------------------------


def test_a_run_in_tokens_trains_the_converted_steps_and_resumes_exactly(tmp_path, capsys):
    cfg = config({"total_tokens": "1.5K"}, [
        {"name": "a", "start_tokens": 0, "end_tokens": 640},
        {"name": "b", "start_tokens": 640, "end_tokens": "1.5K", "data_config": {"batch_size": 8}},
    ], run={"dir": str(tmp_path), "name": "tok", "eval_every": 100, "eval_batches": 1, "log_every": 1})
    path = tmp_path / "tok.yaml"
    path.write_text(yaml.safe_dump(cfg))
    machine = TrainingMachine(str(path), console=False)
    result = machine.train()
    run = tmp_path / "tok"
    assert result.steps == 9 and result.tokens_seen == 5 * 4 * 32 + 4 * 8 * 32
    assert [(tr.step, tr.to_phase) for tr in result.transitions] == [(5, "b")]
    text = (run / "config.yaml").read_text()
    saved = yaml.safe_load(text)
    assert saved["training"]["total_steps"] == 9 and saved["training"]["total_tokens"] is None
    assert [(p["start_step"], p["end_step"]) for p in saved["schedule"]] == [(0, 5), (5, 9)]
    assert "# time as written" in text and "end_tokens: 1500  ->  start_step: 5, end_step: 9" in text
    # resumed with the config as written: converted again, it matches the record: nothing to do
    assert main(["train", "--resume", str(run), str(path)]) == 0
    assert "nothing to do" in capsys.readouterr().out
    # extended past its end like any run in steps
    assert main(["train", "--resume", str(run), "--steps", "12"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(r["step"] for r in records if r["kind"] == "step") == 11 and any(r["kind"] == "extend" for r in records)
    assert yaml.safe_load((run / "config.yaml").read_text())["schedule"][-1]["end_step"] == 12


def test_the_schedule_converts_tokens_itself():
    cfg = StackWiseConfig.from_dict(config({"total_tokens": 1280}, [
        {"name": "a", "start_tokens": 0, "end_tokens": 384}, {"name": "b", "start_tokens": 384, "end_tokens": 1280}]))
    schedule = PhaseSchedule.from_config(cfg, 10)
    assert schedule.step_ranges(10) == [(0, 3), (3, 10)] and schedule[1].start_t == 0.3
