"""Reliability and security: kills, graceful stops, damaged and hostile files, numerical faults,
bad input everywhere, failing disks. Nothing already in a run directory may be lost."""

import hashlib
import json
import os
import pickle
import random
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from stackwise.cli import main
from stackwise.config import ConfigError, StackWiseConfig
from stackwise.training import TrainingMachine
from stackwise.training.checkpoint import CheckpointError, CheckpointManager, _meta_digest, load_checkpoint
from stackwise.training.machine import TrainingError
from tests.runs import growth_config, wait_for

ROOT = Path(__file__).resolve().parents[1]


def tiny(tmp_path, name="run", steps=60, **run):
    return growth_config(tmp_path, name, steps, split=0.4, **run)


def write(tmp_path, cfg, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def step_losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"]) for r in records if r["kind"] == "step"]


def final_weights(run_dir):
    last = CheckpointManager(run_dir).list()[-1]
    return load_file(str(last / "model.safetensors"))


def files_of(path):
    return {p: p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


# ---- 1. crash-kill ---------------------------------------------------------------------------

CLI = [sys.executable, "-m", "stackwise", "train"]


def _wait_for(predicate, proc):
    return wait_for(predicate, proc, interval=0.001)  # a kill must land inside a checkpoint write


def _start(args, cwd):
    return subprocess.Popen(CLI + args, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _steps_logged(run_dir):
    path = run_dir / "metrics.jsonl"
    return path.read_text().count('"kind": "step"') if path.exists() else 0


def _transitions_logged(run_dir):
    path = run_dir / "metrics.jsonl"
    return path.read_text().count('"kind": "transition"') if path.exists() else 0


def test_sigkill_at_random_moments_then_resume_equals_an_uninterrupted_run(tmp_path):
    steps = 150
    reference_cfg = write(tmp_path, tiny(tmp_path, "reference", steps, checkpoint_every=3), "reference.yaml")
    subprocess.run([*CLI, str(reference_cfg)], cwd=ROOT, check=True, capture_output=True)
    reference = tmp_path / "reference"

    run_dir = tmp_path / "killed"
    config = write(tmp_path, tiny(tmp_path, "killed", steps, checkpoint_every=3), "killed.yaml")
    rng = random.Random(7)
    kills = {"random": 0, "checkpoint_write": 0, "after_transition": 0}
    first = True
    while sum(kills.values()) < 12:
        proc = _start([str(config)] if first else ["--resume", str(run_dir)], ROOT)
        first = False
        ckpt_dir = run_dir / "checkpoints"
        before = _steps_logged(run_dir)
        kind = ["checkpoint_write", "after_transition", "random"][sum(kills.values()) % 3]
        target = before + rng.randint(1, 8)
        if kind == "checkpoint_write":
            hit = _wait_for(lambda d=ckpt_dir: d.is_dir() and any(p.name.startswith(".tmp-") for p in d.iterdir()), proc)
        elif kind == "after_transition":
            hit = _wait_for(lambda: _transitions_logged(run_dir) > 0, proc)
            if hit and kills["after_transition"] >= 1:  # once the transition is behind us, kill at random
                kind, hit = "random", _wait_for(lambda n=target: _steps_logged(run_dir) > n, proc)
        else:
            hit = _wait_for(lambda n=target: _steps_logged(run_dir) > n, proc)
        if proc.poll() is not None:  # it finished before we could strike: start over
            assert proc.returncode == 0, proc.stderr.read().decode()
            break
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        if hit:
            kills[kind] += 1
    assert sum(kills.values()) >= 10, kills
    assert kills["checkpoint_write"] >= 1 and kills["after_transition"] >= 1, kills
    done = subprocess.run([*CLI, "--resume", str(run_dir)], cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

    history = step_losses(run_dir)
    assert [s for s, _ in history] == list(range(steps)), "a step is missing or was logged twice"
    assert history == step_losses(reference)
    ours, theirs = final_weights(run_dir), final_weights(reference)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)
    assert not any(p.name.startswith((".tmp-", ".old-")) for p in (run_dir / "checkpoints").iterdir())


# ---- 2. graceful stop --------------------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigterm_and_sigint_stop_gracefully(tmp_path, sig):
    config = write(tmp_path, tiny(tmp_path, "graceful", steps=5000))
    proc = subprocess.Popen([*CLI, str(config)], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    run_dir = tmp_path / "graceful"
    assert _wait_for(lambda: _steps_logged(run_dir) > 5, proc)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert f"resume with: stackwise train --resume {run_dir}" in out
    assert (out + err).count(f"stopped by {sig.name}") == 1  # said once (the CLI's outcome line)
    last = CheckpointManager(run_dir).list()[-1]
    step = load_checkpoint(last).step
    assert 5 < step < 5000 and [s for s, _ in step_losses(run_dir)] == list(range(step))


# ---- 3. damaged checkpoints ----------------------------------------------------------------------


@pytest.fixture
def finished_run(tmp_path):
    machine = TrainingMachine(tiny(tmp_path, steps=12, checkpoint_every=4), console=False)
    machine.train()
    return machine.run_dir


def _truncate(path):
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _flip_a_bit(path):
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


def _wrong_structure(path):
    meta = json.loads((path.parent / "meta.json").read_text())
    meta["rack"]["n_stacks"] = 7
    (path.parent / "meta.json").write_text(json.dumps(meta))


DAMAGE = {
    "truncated weights": ("model.safetensors", _truncate),
    "bit-flipped weights": ("model.safetensors", _flip_a_bit),
    "truncated state": ("state.pt", _truncate),
    "bit-flipped meta": ("meta.json", _flip_a_bit),
    "missing weights": ("model.safetensors", lambda p: p.unlink()),
    "missing meta": ("meta.json", lambda p: p.unlink()),
    "wrong structure": ("model.safetensors", _wrong_structure),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_latest_checkpoint_is_reported_and_skipped(finished_run, damage, capsys):
    name, harm = DAMAGE[damage]
    latest = CheckpointManager(finished_run).list()[-1]
    harm(latest / name)
    if damage != "wrong structure":
        with pytest.raises(CheckpointError, match=str(latest)):
            load_checkpoint(latest)
    config = StackWiseConfig.from_yaml(finished_run / "config.yaml")
    machine = TrainingMachine(config, resume=finished_run)
    assert machine.step == 8  # the previous good one (step 8) took over
    assert str(latest) in capsys.readouterr().err


def test_generate_and_eval_on_bad_run_directories_exit_2(finished_run, tmp_path, capsys):
    for path in CheckpointManager(finished_run).list():
        _truncate(path / "model.safetensors")
    for argv in (["eval", str(finished_run)], ["generate", str(finished_run), "--prompt", "x"],
                 ["eval", str(tmp_path / "nothing")], ["generate", str(tmp_path / "nothing"), "--prompt", "x"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err and err.count("\n") <= 2


# ---- 4. hostile files ----------------------------------------------------------------------------


class _SideEffect:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_a_planted_pickle_is_refused_without_running(finished_run, tmp_path):
    latest = CheckpointManager(finished_run).list()[-1]
    marker = tmp_path / "pwned"
    with open(latest / "state.pt", "wb") as f:
        pickle.dump({"time": _SideEffect(marker)}, f, protocol=2)
    # The attacker forges every checksum too: only the loader's refusal to unpickle objects is left.
    meta = json.loads((latest / "meta.json").read_text())
    meta["sha256"]["state.pt"] = hashlib.sha256((latest / "state.pt").read_bytes()).hexdigest()
    meta["meta_sha256"] = _meta_digest(meta)
    (latest / "meta.json").write_text(json.dumps(meta))
    (latest / "meta.json.sha256").write_text(hashlib.sha256((latest / "meta.json").read_bytes()).hexdigest())
    with pytest.raises(CheckpointError, match="refused"):
        load_checkpoint(latest)
    assert not marker.exists()


def test_yaml_tags_cannot_run_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.yaml"
    path.write_text(f"model: !!python/object/apply:os.system ['touch {marker}']\ntraining: {{}}\ndata: {{}}\n")
    with pytest.raises(ConfigError, match=r"evil\.yaml"):
        StackWiseConfig.from_yaml(path)
    assert not marker.exists()


@pytest.mark.parametrize("name", ["../outside", "/etc", "a/b", "..", "."])
def test_run_names_cannot_escape_the_run_folder(tmp_path, name):
    with pytest.raises(ConfigError, match=r"run\.name"):
        StackWiseConfig.from_dict(tiny(tmp_path, name=name))


# ---- 5. numerical faults ---------------------------------------------------------------------------


def _poison_at(machine, step):
    """From `step` on, the gradient of one weight is NaN (as after an overflow)."""
    weight = machine.model.rack[0].blocks[0].mlp.up.weight
    weight.register_hook(lambda g: torch.full_like(g, float("nan")) if machine.step >= step else g)


def test_nan_stops_the_run_naming_step_phase_and_group_and_keeps_the_last_checkpoint(tmp_path):
    machine = TrainingMachine(tiny(tmp_path, steps=40, checkpoint_every=4, log_every=5,
                                   checkpoint_at_transitions=False), console=False)
    _poison_at(machine, 6)
    with pytest.raises(TrainingError) as err:
        machine.train()
    message = str(err.value)
    assert "step 6" in message and "'one'" in message and "decay" in message
    last = CheckpointManager(machine.run_dir).list()[-1]
    assert last.name == "step_000004"  # nothing written after the fault
    tensors = load_checkpoint(last).tensors
    assert all(torch.isfinite(t).all() for t in tensors.values() if t.is_floating_point())


def test_skip_step_mode_skips_only_the_bad_updates(tmp_path):
    machine = TrainingMachine(tiny(tmp_path, steps=10, on_nonfinite="skip_step"), run_dir=False, console=False)
    weight = machine.model.rack[0].blocks[0].mlp.up.weight
    weight.register_hook(lambda g: torch.full_like(g, float("inf")) if machine.step in (1, 2) else g)
    machine.train_step()
    before = weight.detach().clone()
    machine.train_step()
    machine.train_step()
    assert torch.equal(weight, before)  # steps 1 and 2 skipped
    machine.train_step()  # step 3, still in phase "one" where this weight trains
    assert not torch.equal(weight, before) and torch.isfinite(weight).all()


# ---- 6. bad input everywhere ----------------------------------------------------------------------


def _bad_inputs(tmp_path, run_dir):
    png = tmp_path / "picture.yaml"
    png.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary")
    old = tmp_path / "old.yaml"
    old.write_text(yaml.safe_dump({**tiny(tmp_path), "version": 0, "trainer": {"gpus": 1}}))
    empty = tmp_path / "empty_run"
    empty.mkdir()
    config = write(tmp_path, tiny(tmp_path, "fresh"))
    return [
        ["train", str(tmp_path / "missing.yaml")],
        ["train", str(tmp_path)],                      # a folder as config
        ["train", str(png)],                            # not text
        ["train", str(old)],                            # a config from another version
        ["train", str(config), "training.seq_len=abc"],
        ["train", str(config), "nonsense"],
        ["train", "--resume", str(empty)],
        ["train", "--resume", str(tmp_path / "nowhere")],
        ["train", "--resume", str(run_dir), "model.d_model=64"],  # does not fit the checkpoint
        ["train", "--steps", "0", str(config)],
        ["plan", str(png)],
        ["plan", str(config), "--steps", "-3"],
        ["plot", str(empty)],
        ["plot", str(config)],
        ["eval", str(empty)],
        ["eval", str(run_dir), "--data", str(tmp_path / "missing.txt")],
        ["eval", str(run_dir), "--mask-range", "2", "3"],
        ["generate", str(run_dir)],                     # no prompt
        ["generate", str(run_dir), "--prompt", ""],
        ["generate", str(run_dir), "--prompt", "x", "--temperature", "-1"],
        ["generate", str(empty), "--prompt", "x"],
        ["frobnicate"],
        [],
    ]


def test_every_command_answers_bad_input_with_one_message_and_exit_2(finished_run, tmp_path, capsys):
    snapshot = files_of(finished_run)
    for argv in _bad_inputs(tmp_path, finished_run):
        try:
            code = main(argv)
        except SystemExit as exit_:  # argparse's own usage errors
            code = exit_.code
        err = capsys.readouterr().err
        assert code == 2, (argv, err)
        assert "Traceback" not in err, (argv, err)
        assert err.strip(), argv
    assert files_of(finished_run) == snapshot  # nothing in the run directory changed or was lost


# ---- 7. disk full ---------------------------------------------------------------------------------


def test_a_failing_disk_keeps_the_previous_checkpoint_and_stops_clearly(tmp_path):
    machine = TrainingMachine(tiny(tmp_path, steps=20, checkpoint_every=4, checkpoint_at_transitions=False), console=False)
    for _ in range(5):
        machine.train_step()
    good = files_of(machine.run_dir / "checkpoints")

    def disk_full(tensors, path):
        Path(path).write_bytes(b"\x00" * 10)
        raise OSError(28, "No space left on device")

    machine.checkpoints._save_tensors = disk_full
    with pytest.raises(TrainingError, match="No space left on device") as err:
        for _ in range(5):
            machine.train_step()
    assert "step_000004" in str(err.value) and "intact" in str(err.value)
    assert files_of(machine.run_dir / "checkpoints") == good
    assert load_checkpoint(machine.run_dir / "checkpoints" / "step_000004").step == 4
    assert not any(p.name.startswith(".tmp-") for p in (machine.run_dir / "checkpoints").iterdir())
    machine.log.close()


def test_environment_is_isolated():
    assert os.environ["STACKWISE_CACHE"]  # token caches never touch the home folder in tests
