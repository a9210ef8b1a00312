"""Forged and poisoned checkpoints: the checksums are not keyed, so a forger recomputes them. Every
schema violation in state.pt or meta.json, a deeply nested meta.json and non-finite weights are
reported like any damaged checkpoint: skipped, named, an older one used; with no usable one left,
the command exits 2 without a traceback and the run directory is unchanged. No checkpoint is ever
written holding NaN/Inf. A tied tensor is stored once and the tie comes back on load."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from stackwise.cli import main
from stackwise.config import StackWiseConfig
from stackwise.training import TrainingMachine
from stackwise.training.checkpoint import (
    META_SUM_FILE,
    CheckpointError,
    CheckpointManager,
    _meta_digest,
    load_checkpoint,
)
from stackwise.training.machine import TrainingError
from tests.runs import growth_config


def tiny(tmp_path, name="run", steps=12, **run):
    config = growth_config(tmp_path, name, steps, **{"checkpoint_every": 4, "checkpoint_at_transitions": False, **run})
    config["model"]["tie_embeddings"] = True  # a tied head and embedding: one tensor, stored once
    return config


def files_of(path):
    return {p: p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A finished 12-step run with checkpoints at steps 4, 8 and 12 (made once, copied per test)."""
    root = tmp_path_factory.mktemp("pristine")
    TrainingMachine(tiny(root), console=False).train()
    return root / "run"


@pytest.fixture
def run(pristine, tmp_path):
    target = tmp_path / "run"
    shutil.copytree(pristine, target)
    return target


def checkpoint(run, step):
    return run / "checkpoints" / f"step_{step:06d}"


def _reseal(folder):
    """What a forger does: recompute every checksum (files, meta.json's own, meta.json.sha256)."""
    meta = json.loads((folder / "meta.json").read_text())
    for name in meta["sha256"]:
        meta["sha256"][name] = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    _write_meta(folder, meta)


def _write_meta(folder, meta):
    meta["meta_sha256"] = _meta_digest(meta)
    text = json.dumps(meta).encode()
    (folder / "meta.json").write_bytes(text)
    (folder / META_SUM_FILE).write_text(hashlib.sha256(text).hexdigest())


def forge_state(folder, change):
    state = torch.load(folder / "state.pt", weights_only=True)
    change(state)
    torch.save(state, folder / "state.pt")
    _reseal(folder)


def forge_meta(folder, change):
    meta = json.loads((folder / "meta.json").read_text())
    change(meta)
    _write_meta(folder, meta)


def _set(key, value):
    return lambda d: d.__setitem__(key, value)


def _both_phase_index(folder):
    forge_state(folder, _set("phase_index", 10**6))
    forge_meta(folder, _set("phase_index", 10**6))


STATE_FORGERIES = {
    "phase_index 10**6": (_both_phase_index, "phase_index"),
    "no time": (lambda f: forge_state(f, lambda s: s.pop("time")), "time: missing"),
    "losses a string": (lambda f: forge_state(f, _set("losses", "1.0, 2.0")), "losses"),
    "rng tensor of floats": (lambda f: forge_state(f, lambda s: s["rng"].__setitem__("torch", torch.zeros(7))), "rng.torch"),
    "python rng too short": (lambda f: forge_state(f, lambda s: s["rng"].__setitem__("python", [1, 2, 3])), "rng.python"),
    "optimizer param index out of range": (
        lambda f: forge_state(f, lambda s: s["optimizer"]["param_groups"][0]["params"].append(999)), "optimizer.param_groups"),
    "transition without a field": (lambda f: forge_state(f, _set("transitions", [{"step": 6}])), "transitions.0"),
    "negative tokens": (lambda f: forge_state(f, _set("tokens_seen", -5)), "tokens_seen"),
    "time ahead of meta": (lambda f: forge_state(f, lambda s: s["time"].__setitem__("step", 11)), "time"),
}

META_FORGERIES = {
    "total_steps a string": (lambda f: forge_meta(f, _set("total_steps", "12")), "total_steps"),
    "rack with a bad field": (lambda f: forge_meta(f, lambda m: m["rack"].__setitem__("n_stacks", -1)), "rack"),
    "t off the step": (lambda f: forge_meta(f, _set("t", 0.25)), "t:"),
    "a listed file outside": (lambda f: forge_meta(f, lambda m: m["sha256"].__setitem__("../../x", "0" * 64)), "outside"),
    "a bogus tie": (lambda f: forge_meta(f, _set("tied", {"head.proj.weight": "nowhere"})), "tied"),
    "another run's length": (lambda f: (forge_state(f, lambda s: s["time"].__setitem__("total_steps", 24)),
                                        forge_meta(f, lambda m: m.update(total_steps=24, t=12 / 24))), "total_steps"),
}


def _deep(levels):
    def harm(folder):
        text = b'{"x": ' + b"[" * levels + b"]" * levels + b"}"
        (folder / "meta.json").write_bytes(text)
        (folder / META_SUM_FILE).write_text(hashlib.sha256(text).hexdigest())
    return harm, "nested too deeply"


def _nan_weight(folder):
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["rack.stacks.0.blocks.0.mlp.up.weight"][0, 0] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"))
    _reseal(folder)


def _inf_moment(folder):
    def poison(state):
        entry = next(iter(state["optimizer"]["state"].values()))
        entry["exp_avg"].view(-1)[0] = float("inf")
    forge_state(folder, poison)


def _moment(change):
    def forge(folder):
        def poison(state):
            entry = next(e for e in state["optimizer"]["state"].values() if e["exp_avg"].ndim == 2)
            change(entry)
        forge_state(folder, poison)
    return forge


MOMENT_FORGERIES = {  # found by review: a fused AdamW step read a misshapen moment out of bounds (exit 139)
    "moment of another shape": (_moment(lambda e: e.__setitem__("exp_avg", torch.zeros(3))), "shape"),
    "negative second moment": (_moment(lambda e: e["exp_avg_sq"].view(-1).__setitem__(0, -1.0)), "negative"),
    "negative step count": (_moment(lambda e: e.__setitem__("step", torch.tensor(-3.0))), "negative"),
}


OTHER_FORGERIES = {
    "meta.json 25,000 levels deep": _deep(25_000),
    "meta.json 200,000 levels deep": _deep(200_000),
    "NaN weight": (_nan_weight, "non-finite"),
    "Inf optimizer moment": (_inf_moment, "non-finite"),
}

ALL = {**STATE_FORGERIES, **META_FORGERIES, **OTHER_FORGERIES}


@pytest.mark.parametrize("forgery", ALL)
def test_a_forged_newest_checkpoint_is_skipped_and_named(run, forgery, capsys):
    harm, field = ALL[forgery]
    newest = checkpoint(run, 12)
    harm(newest)
    with pytest.raises(CheckpointError) as err:  # the loader alone, or the resume's fit check
        ckpt = load_checkpoint(newest)
        TrainingMachine(StackWiseConfig.from_yaml(run / "config.yaml"), run_dir=False, restoring=True,
                        console=False).lifecycle.check_fits(ckpt)
    assert str(newest) in str(err.value) and field in str(err.value)
    machine = TrainingMachine(run / "config.yaml", resume=run)
    assert machine.step == 8  # the previous checkpoint took over
    said = capsys.readouterr().err
    assert f"skipping damaged checkpoint: {newest}" in said and field in said and "Traceback" not in said
    machine.close()


@pytest.mark.parametrize("forgery", MOMENT_FORGERIES)
def test_a_forged_optimizer_moment_is_found_while_restoring_and_skipped(run, forgery, capsys):
    harm, field = MOMENT_FORGERIES[forgery]
    newest = checkpoint(run, 12)
    harm(newest)
    machine = TrainingMachine(run / "config.yaml", resume=run)
    assert machine.step == 8  # the previous checkpoint took over
    said = capsys.readouterr().err
    assert f"skipping damaged checkpoint: {newest}" in said and field in said and "Traceback" not in said
    machine.close()


def test_every_checkpoint_forged_exits_2_and_leaves_the_run_as_it_was(run, capsys):
    for step, (harm, _) in zip((4, 8, 12), (STATE_FORGERIES["no time"], META_FORGERIES["rack with a bad field"],
                                            OTHER_FORGERIES["meta.json 200,000 levels deep"]), strict=True):
        harm(checkpoint(run, step))
    snapshot = files_of(run)
    for argv in (["train", "--resume", str(run)], ["eval", str(run)], ["generate", str(run), "--prompt", "x"],
                 ["export", str(run), "--hf", str(run.parent / "hf")]):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert "Traceback" not in err and str(checkpoint(run, 12)) in err, (argv, err)
    assert files_of(run) == snapshot and not (run.parent / "hf").exists()


def test_no_checkpoint_is_written_with_nan_weights(tmp_path):
    machine = TrainingMachine(tiny(tmp_path, steps=20), console=False)
    for _ in range(5):
        machine.train_step()
    before = files_of(machine.run_dir / "checkpoints")
    with torch.no_grad():
        machine.model.rack[0].blocks[0].mlp.up.weight[0, 0] = float("inf")
    with pytest.raises(TrainingError) as err:
        machine.save_checkpoint()
    message = str(err.value)
    assert "rack.stacks.0.blocks.0.mlp.up.weight" in message and "step_000004" in message
    assert files_of(machine.run_dir / "checkpoints") == before  # nothing written, no temporary folder
    machine.close()


def test_a_tied_tensor_is_stored_once_and_tied_again_on_load(run):
    newest = checkpoint(run, 12)
    stored = load_file(str(newest / "model.safetensors"))
    assert "head.proj.weight" not in stored and "embedding.tokens.weight" in stored
    ckpt = load_checkpoint(newest)
    assert ckpt.tensors["head.proj.weight"] is ckpt.tensors["embedding.tokens.weight"]
    machine = TrainingMachine.for_evaluation(run)
    assert machine.model.head.proj.weight is machine.model.embedding.tokens.weight  # still one tensor
    assert torch.equal(machine.model.head.proj.weight, stored["embedding.tokens.weight"])


def test_a_checkpoint_written_before_the_tie_and_the_meta_checksum_still_loads(run):
    """The older layout: both names stored, no meta.json.sha256, no `tied` entry."""
    newest = checkpoint(run, 12)
    tensors = load_file(str(newest / "model.safetensors"))
    tensors["head.proj.weight"] = tensors["embedding.tokens.weight"].clone()
    save_file(tensors, str(newest / "model.safetensors"))
    meta = json.loads((newest / "meta.json").read_text())
    del meta["tied"]
    meta["sha256"]["model.safetensors"] = hashlib.sha256((newest / "model.safetensors").read_bytes()).hexdigest()
    meta["meta_sha256"] = _meta_digest(meta)
    (newest / "meta.json").write_text(json.dumps(meta, indent=2, sort_keys=True))
    (newest / META_SUM_FILE).unlink()
    assert load_checkpoint(newest).step == 12
    assert TrainingMachine.for_evaluation(run).step == 12
    assert CheckpointManager(run).latest_good().path == newest
