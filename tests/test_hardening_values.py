"""Hardening, values: what passes validation must not crash later.

Every float of every section refuses NaN/±Inf (one config-wide rule, found by walking the
config's types, not a list kept by hand); a phase's optimizer/data overrides obey the very rules
of the top level; seeds, threads, LoRA settings and `stack_precision` positions are bounded; sizes
that cannot fit are refused naming the field and the estimate (and accepted with
`run.memory_check: false`); counts that would make building the rack loop for minutes are refused
by arithmetic, in well under 5 s. Each case: exit 2 (or ConfigError), no traceback, the key named,
nothing created.
"""

from __future__ import annotations

import copy
import time
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from stackwise.config import MAX_BLOCKS, ConfigError, LrSchedule, PhaseConfig, Ramp, StackWiseConfig
from stackwise.training import fits
from stackwise.training.fits import check_fits
from tests.runs import cli

BASE = {
    "model": {"d_model": 32, "n_heads": 2, "vocab_size": 300, "max_seq_len": 64,
              "architecture": {"n_stacks": 1, "blocks_per_stack": 1}},
    "training": {"batch_size": 4, "seq_len": 32, "total_steps": 4},
    "data": {"use_dummy_data": True},
}
PHASE = {"name": "only", "start_t": 0.0, "end_t": 1.0}


def with_value(path: str, value, base=BASE) -> dict:
    """A copy of `base` with `value` at dotted `path` (a `schedule.0.` path gets a one-phase schedule)."""
    data = copy.deepcopy(base)
    parts = path.split(".")
    if parts[0] == "schedule":
        data.setdefault("schedule", [copy.deepcopy(PHASE)])
    node = data
    for part in parts[:-1]:
        node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    node[parts[-1]] = value
    return data


def refused(data: dict) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        StackWiseConfig.from_dict(data)
    return err.value


def write(tmp_path: Path, data: dict, name: str = "cfg.yaml") -> Path:
    data = copy.deepcopy(data)
    data["run"] = {**data.get("run", {}), "dir": str(tmp_path / "runs")}
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data))
    return path


# ---- NaN / Inf anywhere -----------------------------------------------------------------------------


def _float_leaves(model: type[BaseModel], prefix: str) -> list[tuple[str, str, typing.Any]]:
    """(path of the float, path to set, builder of the value to set there from a bad float) of
    every float the config types hold, found by walking
    the pydantic models: plain floats, floats inside number-or-ramp / number-or-schedule unions,
    the fields of Ramp and LrSchedule, float pairs and float-valued mappings."""
    leaves = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        members = _members(field.annotation)
        if float in members:
            leaves.append((key, key, lambda bad: bad))
        for sub in members:
            if isinstance(sub, type) and issubclass(sub, BaseModel):
                if sub is Ramp:
                    leaves += [(f"{key}.start", key, lambda bad: {"start": bad, "end": 0.5}),
                               (f"{key}.end", key, lambda bad: {"start": 0.5, "end": bad})]
                elif sub is LrSchedule:
                    leaves += [(f"{key}.peak", key, lambda bad: {"peak": bad}),
                               (f"{key}.final", key, lambda bad: {"peak": 1e-3, "final": bad})]
                elif sub is not PhaseConfig:
                    leaves += _float_leaves(sub, f"{key}.")
            inner = [_members(a) for a in typing.get_args(sub)]
            if typing.get_origin(sub) is tuple and any(float in m for m in inner):
                leaves.append((f"{key}.0", key, lambda bad: [bad, 0.5]))
            if typing.get_origin(sub) is dict and float in inner[-1]:
                leaves.append((f"{key}.p*", key, lambda bad: {"p*": bad}))
            if typing.get_origin(sub) is list:
                for m in inner[0]:
                    if isinstance(m, type) and issubclass(m, BaseModel) and m is not PhaseConfig:
                        leaves += _float_leaves(m, f"{key}.0.")
    return leaves


def _members(annotation) -> list:
    """The alternatives of a type: Annotated and Optional/Union unwrapped, generics kept whole."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _members(typing.get_args(annotation)[0])
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return [m for a in typing.get_args(annotation) for m in _members(a)]
    return [annotation]


FLOAT_LEAVES = (
    [leaf for section in ("model", "training", "data", "run")
     for leaf in _float_leaves(StackWiseConfig.model_fields[section].annotation, f"{section}.")]
    + _float_leaves(PhaseConfig, "schedule.0.")
)


def test_the_walk_finds_the_floats_of_every_level():
    paths = {p for p, _, _ in FLOAT_LEAVES}
    assert len(paths) >= 30, sorted(paths)
    for expected in ("model.rope_theta", "model.norm_eps", "training.optimizer.lr.peak", "training.optimizer.betas.0",
                     "training.optimizer.lr_scale.p*", "data.mask_rate.end", "data.mask_range.0",
                     "schedule.0.optimizer_config.lr", "schedule.0.data_config.mask_rate.start",
                     "schedule.0.model_config.lora.alpha", "training.progressive.lora.dropout", "schedule.0.start_t"):
        assert expected in paths


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")], ids=["nan", "inf", "-inf"])
def test_every_float_field_refuses_nan_and_inf(bad):
    for path, where, build in FLOAT_LEAVES:
        err = refused(with_value(where, build(bad)))
        assert path in err.paths, (path, str(err))
        assert "finite" in str(err), (path, str(err))


@pytest.mark.parametrize("override", ["training.lr=.nan", "training.optimizer.lr={peak: 1.0e-3, final: .inf}",
                                      "model.rope_theta=.inf", "model.norm_eps=-.inf", "data.mask_rate=.nan",
                                      "schedule=[{name: a, start_t: 0, end_t: 1, optimizer_config: {momentum: .nan}}]"])
def test_nan_and_inf_overrides_exit_2_before_anything_is_created(tmp_path, capsys, override):
    config = write(tmp_path, BASE)
    code, _, err = cli(["train", str(config), override], capsys)
    assert code == 2 and "Traceback" not in err and "finite" in err, err
    assert not (tmp_path / "runs").exists()


# ---- one set of rules for a section and a phase's override of it ------------------------------------

SHARED_RULES = [
    # (key in training/data, the phase's key, bad value, where the error points below the key)
    ("training.optimizer.lr", "optimizer_config.lr", -1.0, ""),
    ("training.optimizer.lr", "optimizer_config.lr", 0.0, ""),
    ("training.optimizer.lr", "optimizer_config.lr", 1e39, ""),
    ("training.optimizer.lr", "optimizer_config.lr", {"peak": -1.0}, ".peak"),
    ("training.optimizer.betas", "optimizer_config.betas", [2.0, 3.0], ""),
    ("training.optimizer.betas", "optimizer_config.betas", [0.9], ".1"),
    ("training.optimizer.weight_decay", "optimizer_config.weight_decay", -0.1, ""),
    ("training.optimizer.momentum", "optimizer_config.momentum", 1.0, ""),
    ("training.optimizer.grad_clip", "optimizer_config.grad_clip", 0.0, ""),
    ("training.optimizer.lr_scale", "optimizer_config.lr_scale", {"rack*": -2.0}, ".rack*"),
    ("training.optimizer.optimizer_type", "optimizer_config.optimizer_type", "Lion", ""),
    ("data.mask_rate", "data_config.mask_rate", 0.0, ""),
    ("data.mask_rate", "data_config.mask_rate", 5.0, ""),
    ("data.mask_rate", "data_config.mask_rate", {"start": 0.0, "end": 0.5}, ".start"),
    ("data.mask_range", "data_config.mask_range", [0.9, 0.1], ""),
    ("data.mask_range", "data_config.mask_range", [0.0, 0.5], ""),
    ("training.seq_len", "data_config.seq_len", 1, ""),
    ("training.batch_size", "data_config.batch_size", 0, ""),
]


@pytest.mark.parametrize(("top", "phase", "bad", "below"), SHARED_RULES)
def test_a_phase_override_obeys_the_rules_of_its_section(top, phase, bad, below):
    top_err = refused(with_value(top, bad))
    phase_err = refused(with_value(f"schedule.0.{phase}", bad))
    top_key, phase_key = top + below, f"schedule.0.{phase}{below}"
    assert top_key in top_err.paths, str(top_err)
    assert phase_key in phase_err.paths, str(phase_err)
    # the same rule, so the same words
    assert {m for p, m, _ in top_err.problems if p == top_key} == {m for p, m, _ in phase_err.problems if p == phase_key}


def test_bad_phase_values_stop_train_and_plan_with_the_phase_key(tmp_path, capsys):
    cases = [
        ({"optimizer_config": {"lr": -1}}, "schedule.0.optimizer_config.lr"),
        ({"optimizer_config": {"lr": 0}}, "schedule.0.optimizer_config.lr"),
        ({"optimizer_config": {"betas": [2, 3]}}, "schedule.0.optimizer_config.betas"),
        ({"task": "diffusion", "data_config": {"mask_range": [0.9, 0.1]}}, "schedule.0.data_config.mask_range"),
        ({"task": "mlm", "data_config": {"mask_rate": 5}}, "schedule.0.data_config.mask_rate"),
        ({"model_config": {"trunk": "qlora", "lora": {"targets": ["bogus"]}}}, "schedule.0.model_config.lora.targets.0"),
    ]
    for settings, key in cases:
        config = write(tmp_path, {**BASE, "schedule": [{**PHASE, **settings}]})
        for command in (["train", str(config)], ["plan", str(config), "--no-data"]):
            code, _, err = cli(command, capsys)
            assert code == 2 and "Traceback" not in err and key in err, (command, settings, err)
            assert "Spec." not in err  # the user's words, not internal class names
    assert not (tmp_path / "runs").exists()


# ---- bounded integers and structure settings --------------------------------------------------------


@pytest.mark.parametrize(("path", "value"), [
    ("training.seed", 2**70), ("training.seed", 2**63), ("training.seed", -1),
    ("run.threads", 10**5), ("run.threads", 0),
    ("schedule.0.model_config.lora.rank", 10**6), ("training.progressive.lora.rank", 33),
    ("schedule.0.model_config.lora.targets", ["bogus"]), ("schedule.0.model_config.lora.targets", []),
    ("training.progressive.lora.targets", ["q", "nope"]),
    ("schedule.0.model_config.stack_precision", {5: "bf16"}), ("schedule.0.model_config.stack_precision", {-1: "bf16"}),
])
def test_out_of_range_settings_are_refused_naming_the_key(path, value):
    err = refused(with_value(path, value))
    assert any(p.startswith(path) for p in err.paths), str(err)


def test_lora_targets_must_name_a_layer_of_this_attention_kind():
    mla = with_value("model.attention", "mla")
    mla["model"]["n_kv_heads"] = 2
    err = refused(with_value("schedule.0.model_config.lora.targets", ["k"], base=mla))  # MLA has no plain `k`
    assert "schedule.0.model_config.lora.targets" in err.paths and "kv_down" in str(err)
    StackWiseConfig.from_dict(with_value("schedule.0.model_config.lora.targets", ["k_up", "o"], base=mla))


def test_stack_precision_positions_follow_the_phase_growth():
    grown = {**BASE, "schedule": [{"name": "a", "start_t": 0.0, "end_t": 0.5},
                                  {"name": "b", "start_t": 0.5, "end_t": 1.0, "model_config": {"grow": {"n": 2}}}]}
    ok = copy.deepcopy(grown)
    ok["schedule"][1]["model_config"]["stack_precision"] = {2: "bf16"}
    StackWiseConfig.from_dict(ok)  # three stacks after the growth: position 2 exists
    bad = copy.deepcopy(grown)
    bad["schedule"][1]["model_config"]["stack_precision"] = {3: "bf16"}
    assert refused(bad).paths == ["schedule.1.model_config.stack_precision.3"]
    early = copy.deepcopy(grown)
    early["schedule"][0]["model_config"] = {"stack_precision": {1: "bf16"}}  # before the growth: one stack
    assert refused(early).paths == ["schedule.0.model_config.stack_precision.1"]


# ---- sizes that cannot fit ------------------------------------------------------------------------

DEVICE_GIB = 16


@pytest.fixture
def sixteen_gib(monkeypatch):
    """A host of 16 GiB, whatever this machine has: the refusals do not depend on where tests run."""
    monkeypatch.setattr(fits, "host_memory_bytes", lambda: DEVICE_GIB * 2**30)


ABSURD = [
    ("model.d_model", 10**9), ("model.vocab_size", 10**9), ("model.ffn_hidden", 10**9),
    ("model.max_seq_len", 10**9), ("training.batch_size", 10**9), ("model.vocab_size", 5 * 10**7),
    ("model.d_model", 65536), ("model.ffn_hidden", 10**8),
]


@pytest.mark.parametrize(("path", "value"), ABSURD)
def test_sizes_that_cannot_fit_are_refused_naming_the_field_and_the_estimate(sixteen_gib, path, value):
    config = StackWiseConfig.from_dict(with_value(path, value))  # a valid config ...
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        check_fits(config, 4, "cpu")  # ... that cannot run here
    assert time.monotonic() - start < 5
    assert err.value.paths == [path], str(err.value)
    text = str(err.value)
    assert "GiB" in text and f"{DEVICE_GIB}.0 GiB of host RAM" in text and "run.memory_check: false" in text
    # the override: the same config is accepted
    check_fits(config.with_overrides(["run.memory_check=false"]), 4, "cpu")


def test_a_phase_data_size_is_named_by_its_phase_key(sixteen_gib):
    config = StackWiseConfig.from_dict({**BASE, "schedule": [
        {"name": "a", "start_t": 0.0, "end_t": 0.5},
        {"name": "b", "start_t": 0.5, "end_t": 1.0, "data_config": {"batch_size": 10**9}}]})
    with pytest.raises(ConfigError) as err:
        check_fits(config, 4, "cpu")
    assert err.value.paths == ["schedule.1.data_config.batch_size"] and "phase 'b'" in str(err.value)


def test_usual_configs_fit(sixteen_gib, short_form_path):
    check_fits(StackWiseConfig.from_dict(BASE), 4, "cpu")
    check_fits(StackWiseConfig.from_yaml(short_form_path), 10, "cpu")


def test_plan_warns_about_a_run_that_cannot_fit_and_still_shows_it(sixteen_gib, tmp_path, capsys):
    config = write(tmp_path, BASE)
    code, out, err = cli(["plan", str(config), "model.vocab_size=50000000", "--no-data"], capsys)
    assert code == 0 and "Traceback" not in err
    assert "warning: model.vocab_size=50000000 is too large to fit" in err and "GiB" in err
    assert "mem_GiB" in out  # the table is still there, to see where the memory goes
    code, out, err = cli(["plan", str(config), "model.vocab_size=50000000", "run.memory_check=false", "--no-data"], capsys)
    assert code == 0 and "warning" not in err and "mem_GiB" in out
    # shapes whose byte counts overflow cannot even be planned: one message, exit 2
    code, out, err = cli(["plan", str(config), "model.d_model=1000000000", "--no-data"], capsys)
    assert code == 2 and "Traceback" not in err and "model.d_model" in err
    assert not (tmp_path / "runs").exists()


def test_absurd_sizes_are_valid_configs_with_the_override():
    for path, value in ABSURD:
        data = with_value(path, value)
        data["run"] = {"memory_check": False}
        assert StackWiseConfig.from_dict(data).run.memory_check is False


def test_overflowing_shapes_with_the_override_are_still_one_message(tmp_path, capsys):
    # run.memory_check: false skips the estimate, but shapes whose byte counts overflow 64 bits
    # cannot even be built on the meta device: train refuses them before anything is created.
    config = write(tmp_path, BASE)
    code, _, err = cli(["train", str(config), "model.d_model=1000000000", "run.memory_check=false"], capsys)
    assert code == 2 and "Traceback" not in err and "overflow 64-bit" in err and "d_model" in err
    assert not (tmp_path / "runs").exists()


def test_device_memory_is_known_for_the_host():
    total, what = fits.device_memory("cpu")
    assert total > 2**28 and what == "host RAM"


# ---- counts that would keep building for minutes ------------------------------------------------------

HUGE_COUNTS = [
    ("model.architecture.n_stacks", 10**6, "model.architecture.n_stacks"),
    ("model.architecture.blocks_per_stack", 10**6, "model.architecture.blocks_per_stack"),
    ("schedule.0.model_config.grow", {"n": 10**6}, "schedule.0.model_config.grow.n"),
    ("schedule.0.model_config.grow", {"n": 2, "blocks": 10**6}, "schedule.0.model_config.grow.blocks"),
    ("schedule.0.model_config.grow", {"init": "stack", "factor": 10**6}, "schedule.0.model_config.grow.factor"),
    ("training.progressive.target_stacks", 10**6, "training.progressive.target_stacks"),
]


@pytest.mark.parametrize(("path", "value", "key"), HUGE_COUNTS)
def test_huge_counts_are_refused_by_arithmetic_in_well_under_5_s(tmp_path, capsys, path, value, key):
    start = time.monotonic()
    err = refused(with_value(path, value))
    assert key in err.paths and f"at most {MAX_BLOCKS}" in str(err)
    config = write(tmp_path, with_value(path, value))
    code, _, stderr = cli(["plan", str(config), "--no-data"], capsys)
    assert code == 2 and key in stderr and "Traceback" not in stderr
    assert time.monotonic() - start < 5
    assert not (tmp_path / "runs").exists()


def test_growth_up_to_the_bound_is_accepted():
    StackWiseConfig.from_dict(with_value("schedule.0.model_config.grow", {"n": MAX_BLOCKS - 1}))
    refused(with_value("schedule.0.model_config.grow", {"n": MAX_BLOCKS}))


@pytest.mark.parametrize(("path", "value"), [("training.total_steps", True), ("training.batch_size", False),
                                             ("training.optimizer.lr", True), ("model.d_model", True)])
def test_true_and_false_are_not_numbers(path, value):
    # pydantic alone reads true as 1: `training.total_steps=true` ran one step.
    assert path in refused(with_value(path, value)).paths
