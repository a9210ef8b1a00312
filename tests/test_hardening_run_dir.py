"""The run directory: one owner at a time (a lock naming its pid; a killed owner's lock does not
block), resume never rewrites history (refused changes listed, allowed ones recorded, a finished
run left byte for byte as it was), damaged layouts and metrics, failed starts that leave nothing,
unusable targets refused before anything is made, and a full disk during a checkpoint. Every
refusal is exit 2 with one message naming the field or path, and no traceback."""

import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import torch
import yaml
from safetensors import SafetensorError

from stackwise.cli import main
from stackwise.training import TrainingMachine
from stackwise.training.checkpoint import CheckpointManager, load_checkpoint
from stackwise.training.logger import read_metrics
from stackwise.training.run_dir import RunLock
from tests.runs import growth_config, wait_for

ROOT = Path(__file__).resolve().parents[1]


def tiny(tmp_path, name="run", steps=12, **run):
    return growth_config(tmp_path / "runs", name, steps, **{"checkpoint_every": 4, "checkpoint_at_transitions": False, **run})


def write(tmp_path, cfg, name="cfg.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def files_of(path):
    return {p: p.read_bytes() for p in sorted(Path(path).rglob("*")) if p.is_file()}


def records(run, kind):
    return [r for r in read_metrics(run) if r["kind"] == kind]


def refused(argv, capsys, *named):
    code = main(argv)
    err = capsys.readouterr().err
    assert code == 2, (argv, err)
    assert "Traceback" not in err, err
    for text in named:
        assert text in err, (text, err)
    return err


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory):
    """A 12-step run stopped after step 8 (checkpoints at 4 and 8; phase 'two' entered at 6)."""
    root = tmp_path_factory.mktemp("stopped")
    machine = TrainingMachine(tiny(root), console=False)
    for _ in range(8):
        machine.train_step()
    machine.close()
    return root / "runs" / "run"


@pytest.fixture
def run(stopped_run, tmp_path):
    target = tmp_path / "runs" / "run"
    shutil.copytree(stopped_run, target)
    return target


# ---- one owner -------------------------------------------------------------------------------


def test_a_second_process_is_refused_naming_the_pid_and_a_killed_owner_does_not_block(tmp_path, capsys):
    cfg = write(tmp_path, tiny(tmp_path, "live", steps=100_000, checkpoint_every=2))
    proc = subprocess.Popen([sys.executable, "-m", "stackwise", "train", str(cfg)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run = tmp_path / "runs" / "live"
    try:
        assert wait_for(lambda: (run / "checkpoints").is_dir() and len(CheckpointManager(run).list()) >= 2, proc)
        refused(["train", "--resume", str(run)], capsys, f"pid {proc.pid}", str(run))
        assert proc.poll() is None  # the live run goes on, its in-progress checkpoint untouched
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    lock = run / ".lock"
    assert lock.read_text().strip() == str(proc.pid)  # left behind by the killed owner
    machine = TrainingMachine(run / "config.yaml", resume=run, console=False)
    assert lock.read_text().strip() == str(os.getpid())  # taken over: the kernel dropped the dead one's lock
    machine.close()
    assert not lock.exists()


def test_a_refused_resume_removes_nothing_that_appeared_meanwhile(run, capsys, monkeypatch):
    """The race of the issue: the live owner writes between the refused process's look at the
    folder and its attempt to lock it; nothing of the owner's may go."""
    holder = open(run / ".lock", "a+")  # noqa: SIM115 - another owner, holding the lock
    fcntl.flock(holder, fcntl.LOCK_EX)
    holder.write("4242\n")
    holder.flush()
    original = RunLock.acquire
    in_progress = run / "checkpoints" / ".tmp-step_000009-4242"

    def racing(self):
        in_progress.mkdir()  # the owner's next checkpoint, begun meanwhile
        original(self)

    monkeypatch.setattr(RunLock, "acquire", racing)
    try:
        refused(["train", "--resume", str(run)], capsys, "pid 4242")
        assert in_progress.is_dir() and (run / ".lock").read_text() == "4242\n"
    finally:
        holder.close()


# ---- resume never rewrites history ----------------------------------------------------------------


def test_changes_that_rewrite_history_are_refused_and_listed(run, tmp_path, capsys):
    snapshot = files_of(run)
    for overrides, named in (
        (["training.seed=7"], "training.seed: 0 → 7"),
        (["training.grad_accum_steps=2"], "training.grad_accum_steps"),
        (["training.optimizer.betas=[0.8, 0.9]"], "phase 0 'one'"),
        (["model.d_model=64"], "model.d_model"),
        (["data.val_fraction=0.1"], "data.val_fraction"),
        (["training.seed=7", "training.optimizer.optimizer_type=SGD"], "optimizer.optimizer_type"),
    ):
        err = refused(["train", "--resume", str(run), *overrides], capsys, named, str(run))
        assert err.count("  - ") >= len(overrides)  # each change listed
    moved = tiny(tmp_path)
    moved["schedule"][0]["end_t"], moved["schedule"][1]["start_t"] = 0.75, 0.75  # a boundary already passed
    refused(["train", str(write(tmp_path, moved)), "--resume", str(run)], capsys, "steps: [0, 6] → [0, 9]")
    assert files_of(run) == snapshot


def test_allowed_changes_are_recorded_with_the_earlier_config(run, capsys):
    before = (run / "config.yaml").read_bytes()
    assert main(["train", "--resume", str(run), "run.eval_every=3", "run.keep_last=5"]) == 0
    assert (run / "config-000008.yaml").read_bytes() == before
    assert yaml.safe_load((run / "config.yaml").read_text())["run"]["eval_every"] == 3
    [event] = records(run, "resume")
    assert "run.eval_every: 1000 → 3" in event["changes"] and "run.keep_last: 3 → 5" in event["changes"]
    assert event["previous_config"] == "config-000008.yaml" and event["step"] == 8
    assert [r["step"] for r in records(run, "step")] == list(range(12))


def test_a_later_phase_may_change_before_it_starts(stopped_run, tmp_path, capsys):
    run = tmp_path / "early" / "run"
    shutil.copytree(stopped_run, run)
    shutil.rmtree(CheckpointManager(run).list()[-1])  # back to step 4: phase 'two' not started
    cfg = tiny(tmp_path)
    cfg["schedule"][1]["optimizer_config"] = {"lr": 1e-3}
    assert main(["train", str(write(tmp_path, cfg)), "--resume", str(run)]) == 0
    [event] = records(run, "resume")
    assert any(c.startswith("phase 1 'two' (not started) optimizer.lr: 0.003 → 0.001") for c in event["changes"])
    assert (run / "config-000004.yaml").is_file()


def test_a_finished_run_resumed_with_nothing_to_do_is_left_byte_identical(tmp_path, capsys):
    cfg = write(tmp_path, tiny(tmp_path, steps=8))
    assert main(["train", str(cfg)]) == 0
    run = tmp_path / "runs" / "run"
    assert (run / "loss.png").is_file()
    snapshot = files_of(run)
    for extra in ([], ["run.eval_every=5"]):
        capsys.readouterr()
        assert main(["train", "--resume", str(run), *extra]) == 0
        assert "nothing to do" in capsys.readouterr().out
        assert files_of(run) == snapshot
    refused(["train", "--resume", str(run), "training.seed=3"], capsys, "training.seed")
    assert files_of(run) == snapshot


# ---- damaged layouts ----------------------------------------------------------------------------------


def test_checkpoints_that_is_a_file_is_refused_and_nothing_is_wiped(run, capsys):
    shutil.rmtree(run / "checkpoints")
    (run / "checkpoints").write_text("not a folder")
    snapshot = files_of(run)
    refused(["train", "--resume", str(run)], capsys, str(run / "checkpoints"), "not a folder")
    assert files_of(run) == snapshot


def test_metrics_with_invalid_utf8_do_not_stop_a_resume(run, capsys):
    metrics = run / "metrics.jsonl"
    lines = metrics.read_bytes().split(b"\n")
    lines[0] = b'{"kind": "note", "text": "\xff\xfe broken"}'  # kept as it is: it is history
    metrics.write_bytes(b"\n".join(lines) + b"\xc3\x28 torn garbage after the checkpoint\n")
    assert main(["train", "--resume", str(run)]) == 0
    data = metrics.read_bytes()
    assert data.startswith(lines[0]) and b"torn garbage" not in data
    assert [r["step"] for r in records(run, "step")] == list(range(12))


# ---- failed starts leave nothing -----------------------------------------------------------------


def _phase_two(**model_config):
    def change(cfg, tmp_path):
        cfg["schedule"][1]["model_config"] = model_config
    return change


def _data(paths):
    def change(cfg, tmp_path):
        (tmp_path / "bad.jsonl").write_text('{"text": "hello"}\nnot json\n')
        (tmp_path / "empty.txt").write_text("")
        (tmp_path / "no-text").mkdir()
        cfg["data"] = {"paths": [str(tmp_path / p) for p in paths]}
    return change


FAILED_STARTS = {
    "trainable last:99": (_phase_two(trainable="last:99"), "schedule.1.model_config.trainable"),
    "trainable [7]": (_phase_two(trainable=[7]), "schedule.1.model_config.trainable"),
    "new without growth": (_phase_two(trainable="new"), "schedule.1.model_config.trainable"),
    "interleave inside a stack": (_phase_two(grow={"where": "interleave", "every": 3}, trainable="new"), "every"),
    "missing corpus": (_data(["missing.txt"]), "missing.txt"),
    "a record that is not JSON": (_data(["bad.jsonl"]), "bad.jsonl"),
    "empty corpus": (_data(["empty.txt"]), "empty.txt"),
    "a folder without text": (_data(["no-text"]), "no-text"),
}


@pytest.mark.parametrize("case", FAILED_STARTS)
def test_a_failed_start_leaves_nothing_and_the_next_one_gets_the_plain_name(tmp_path, case, capsys):
    change, named = FAILED_STARTS[case]
    runs = tmp_path / "runs"
    runs.mkdir()
    (runs / "keep.txt").write_text("was here before")  # never touched
    cfg = tiny(tmp_path, steps=4)
    change(cfg, tmp_path)
    refused(["train", str(write(tmp_path, cfg, "bad.yaml"))], capsys, named)
    assert sorted(p.name for p in runs.iterdir()) == ["keep.txt"]
    if case == "trainable last:99":  # once: a good start now gets runs/run, not runs/run-2
        assert main(["train", str(write(tmp_path, tiny(tmp_path, steps=2)))]) == 0
        assert sorted(p.name for p in runs.iterdir()) == ["keep.txt", "run"]


def test_a_full_disk_at_start_leaves_no_empty_config(tmp_path, capsys, monkeypatch):
    def no_space(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("stackwise.training.run_dir.os.fsync", no_space)
    refused(["train", str(write(tmp_path, tiny(tmp_path, steps=2)))], capsys, "config.yaml", "No space left on device")
    assert not (tmp_path / "runs").exists()


# ---- unusable targets, refused before anything is made -------------------------------------------


def test_unusable_run_directories_are_refused_naming_path_and_cause(tmp_path, capsys):
    cfg = write(tmp_path, tiny(tmp_path, steps=2))
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    refused(["train", str(cfg), f"run.dir={blocker}"], capsys, str(blocker), "is a file")
    refused(["train", str(cfg), f"run.dir={blocker}/deeper"], capsys, str(blocker), "is a file")
    refused(["train", str(cfg), "run.dir=/proc/stackwise-test"], capsys, "/proc", "virtual filesystem")
    refused(["train", str(cfg), "run.name=" + "x" * 300], capsys, "run.name")
    nul = tiny(tmp_path, steps=2)
    nul["run"]["name"] = "a\0b"
    refused(["train", str(write(tmp_path, nul, "nul.yaml"))], capsys, "run.name")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a-file", "cfg.yaml", "nul.yaml"]
    assert not os.path.lexists("/proc/stackwise-test")


def _read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        return folder, lambda: folder.chmod(0o755)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if mounted.returncode != 0:
        pytest.skip("running as root and no read-only filesystem can be mounted here")
    return folder, lambda: subprocess.run(["umount", str(folder)], check=False)


def test_a_read_only_run_dir_is_refused(tmp_path, capsys):
    folder, undo = _read_only_folder(tmp_path)
    try:
        refused(["train", str(write(tmp_path, tiny(tmp_path, steps=2))), f"run.dir={folder}/runs"], capsys,
                str(folder), "read-only" if os.geteuid() == 0 else "not writable")
        assert not (folder / "runs").exists()
    finally:
        undo()


# ---- a full disk during a checkpoint --------------------------------------------------------------


def _fail_second_call(monkeypatch, owner, name, error):
    """The second checkpoint file written this way fails (the first checkpoint lands)."""
    original, calls = getattr(owner, name), []

    def flaky(obj, target, *args, **kwargs):
        if str(target).endswith(("state.pt", "model.safetensors")):
            calls.append(1)
            if len(calls) == 2:
                raise error
        return original(obj, target, *args, **kwargs)

    monkeypatch.setattr(owner, name, flaky)


DISK_FULL = {
    "torch.save": (torch, "save", RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 4480 vs 4374")),
    "safetensors": (safetensors.torch, "save_file", SafetensorError(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })')),
    "os": (safetensors.torch, "save_file", OSError(28, "No space left on device")),
}


@pytest.mark.parametrize("case", DISK_FULL)
def test_a_full_disk_during_a_checkpoint_is_one_message_and_keeps_the_previous_one(tmp_path, case, capsys, monkeypatch):
    owner, name, error = DISK_FULL[case]
    _fail_second_call(monkeypatch, owner, name, error)
    run = tmp_path / "runs" / "run"
    err = refused(["train", str(write(tmp_path, tiny(tmp_path)))], capsys, str(run / "checkpoints" / "step_000008"),
                  "step_000004 is intact", str(error).splitlines()[0][:40])
    assert err.strip().splitlines()[-1].startswith("stackwise train: writing the checkpoint of step 8 failed")
    monkeypatch.undo()
    assert [p.name for p in CheckpointManager(run).list()] == ["step_000004"]
    assert load_checkpoint(run / "checkpoints" / "step_000004").step == 4
    assert not any(p.name.startswith(".") for p in (run / "checkpoints").iterdir())


# ---- what the console says ---------------------------------------------------------------------------


def test_a_plain_run_says_nothing_of_the_cache_and_ends_at_the_last_step(tmp_path, capsys):
    plain = tiny(tmp_path, steps=6)
    del plain["schedule"]
    assert main(["train", str(write(tmp_path, plain))]) == 0
    err = capsys.readouterr().err
    assert "activation cache" not in err
    assert "step      6/6" in err and "step      0/6" not in err
    grown = tiny(tmp_path, "grown", steps=6)  # phase 'two' trains on a frozen trunk: there it is said
    assert main(["train", str(write(tmp_path, grown, "grown.yaml"))]) == 0
    assert capsys.readouterr().err.count("activation cache") == 1
    assert json.loads((tmp_path / "runs" / "grown" / "metrics.jsonl").read_text().splitlines()[0])["kind"] == "cache"
