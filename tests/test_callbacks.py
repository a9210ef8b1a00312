"""Callbacks and loggers: every event of a run in order, the read-only view, stops, errors, wandb."""

import dataclasses
import importlib.util
import json
import re
import signal
import sys
import time
from pathlib import Path

import pytest

from stackwise.config import ConfigError
from stackwise.training import Callback, TrainingMachine


def tiny_config(tmp_path, **run):
    return {
        "model": {"d_model": 32, "n_heads": 2, "architecture": {"n_stacks": 2, "blocks_per_stack": 1}, "max_seq_len": 32},
        "training": {"batch_size": 2, "seq_len": 16, "optimizer": {"lr": 2e-3}, "seed": 3},
        "data": {"use_dummy_data": True},
        "schedule": [
            {"name": "both", "start_t": 0.0, "end_t": 0.5},
            {"name": "top", "start_t": 0.5, "end_t": 1.0, "model_config": {"trainable": "last:1"}},
        ],
        "run": {"dir": str(tmp_path / "runs"), "eval_every": 3, "eval_batches": 1, "log_every": 3, **run},
    }


class Recorder(Callback):
    """Keeps (event, view, payload) for every event."""

    def __init__(self):
        self.events = []

    def _add(self, name, run, payload=None):
        self.events.append((name, run, payload))

    def on_run_start(self, run):
        self._add("run_start", run)

    def on_step_end(self, run, metrics):
        self._add("step_end", run, dict(metrics))

    def on_log(self, run, record):
        self._add("log", run, dict(record))

    def on_eval(self, run, results):
        self._add("eval", run, dict(results))

    def on_phase_transition(self, run, transition):
        self._add("transition", run, transition)

    def on_checkpoint(self, run, path):
        self._add("checkpoint", run, path)

    def on_stop(self, run, signal):
        self._add("stop", run, signal)

    def on_run_end(self, run, result):
        self._add("run_end", run, result)

    def on_exception(self, run, error):
        self._add("exception", run, error)

    def names(self):
        return [name for name, _, _ in self.events]


def metrics(run_dir):
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]


def test_a_callback_hears_every_event_of_a_two_phase_run_in_order(tmp_path):
    rec = Recorder()
    machine = TrainingMachine(tiny_config(tmp_path), total_steps=8, console=False, callbacks=[rec])
    result = machine.train()

    # 8 steps, logs and evals every 3 steps and at each phase's end (step 4), the transition at
    # step 4 (after the checkpoint of the old phase's end), the final checkpoint, the result.
    expected = [("run_start", 0), ("step_end", 1), ("step_end", 2),
                ("log", 3), ("eval", 3), ("step_end", 3),
                ("log", 4), ("eval", 4), ("step_end", 4),
                ("checkpoint", 4), ("transition", 4), ("step_end", 5),
                ("log", 6), ("eval", 6), ("step_end", 6), ("step_end", 7),
                ("log", 8), ("eval", 8), ("step_end", 8),
                ("checkpoint", 8), ("run_end", 8)]
    assert [(name, run.step) for name, run, _ in rec.events] == expected

    # The same events, in the same order, as the run's metrics.jsonl records.
    kinds = {"step": "log", "eval": "eval", "checkpoint": "checkpoint", "transition": "transition"}
    assert [kinds[r["kind"]] for r in metrics(machine.run_dir) if r["kind"] in kinds] == \
        [name for name in rec.names() if name in kinds.values()]

    switch = expected.index(("transition", 4))  # the events of step 4 before it belong to the old phase
    for i, (name, run, payload) in enumerate(rec.events):
        assert run.t == run.step / 8 and run.total_steps == 8 and run.run_dir == machine.run_dir
        assert (run.phase, run.phase_index) == (("both", 0) if i < switch else ("top", 1))
        if name == "step_end":
            assert payload["step"] == run.step - 1 and payload["phase"] == ("both" if payload["step"] < 4 else "top")
            assert payload["tokens"] == run.tokens_seen == run.step * 2 * 16
            assert payload["t"] == payload["step"] / 8 and payload["lr"] > 0
            # The loss is on the host (a float) exactly on logged steps; None elsewhere (no sync).
            logged = run.step in (3, 4, 6, 8)
            assert payload["loss"] == (result.losses[payload["step"]] if logged else None)
        if name == "log":
            assert payload["step"] == run.step - 1 and payload["loss"] == result.losses[payload["step"]]
        if name == "eval":
            assert set(payload) == {"val_loss", "val_bpb"} and dict(run.last_eval) == payload
        if name == "checkpoint":
            assert payload.is_dir() and payload.parent == machine.run_dir / "checkpoints"
    transition = rec.events[switch][2]
    assert (transition.step, transition.t, transition.from_phase, transition.to_phase) == (4, 0.5, "both", "top")
    assert rec.events[-1][2] is result and result.steps == 8 and result.stopped is None


def test_the_view_is_read_only(tmp_path):
    rec = Recorder()
    TrainingMachine(tiny_config(tmp_path), total_steps=2, run_dir=False, console=False, callbacks=[rec]).train()
    run = rec.events[0][1]
    with pytest.raises(dataclasses.FrozenInstanceError):
        run.step = 5
    with pytest.raises(TypeError):
        run.config["run"]["log_every"] = 1
    assert run.config["model"]["d_model"] == 32 and run.run_dir is None
    assert rec.names()[-1] == "run_end"


def test_a_signal_stop_gives_on_stop_then_on_run_end(tmp_path):
    class StopAtStep2(Recorder):
        def on_step_end(self, run, metrics):
            super().on_step_end(run, metrics)
            if run.step == 2:
                signal.raise_signal(signal.SIGTERM)  # what `kill` does; the machine stops after this step

    rec = StopAtStep2()
    result = TrainingMachine(tiny_config(tmp_path), total_steps=8, console=False, callbacks=[rec]).train()
    assert result.stopped == "SIGTERM" and result.steps == 2
    assert rec.names()[-4:] == ["step_end", "checkpoint", "stop", "run_end"]
    assert rec.events[-2][2] == "SIGTERM" and rec.events[-2][1].step == 2


def test_a_failing_callback_stops_the_run_after_a_complete_step_and_it_resumes(tmp_path):
    class Boom(Callback):
        def on_log(self, run, record):
            raise RuntimeError("boom")

    rec = Recorder()
    config = tiny_config(tmp_path, checkpoint_every=2)
    machine = TrainingMachine(config, total_steps=8, console=False, callbacks=[Boom(), rec])
    with pytest.raises(RuntimeError, match="boom") as caught:
        machine.train()
    assert "Boom.on_log failed after 3 steps" in "".join(getattr(caught.value, "__notes__", [])) or sys.version_info < (3, 11)
    # The step that logged (index 2) completed: its eval ran, time advanced; no callback heard
    # more of it; the other callbacks were told the run failed, and it did not "end".
    assert machine.step == 3 and machine.last_eval
    assert rec.names()[-2:] == ["step_end", "exception"] and "run_end" not in rec.names()
    errors = [r for r in metrics(machine.run_dir) if r["kind"] == "error"]
    assert len(errors) == 1 and "Boom.on_log" in errors[0]["message"]
    resumed = TrainingMachine(machine.run_dir / "config.yaml", console=False, resume=machine.run_dir).train()
    assert resumed.steps == 8 and len(resumed.losses) == 8


def test_the_loggers_line_is_said_once(tmp_path, capsys):
    TrainingMachine(tiny_config(tmp_path), total_steps=4, console=True).train()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("loggers:")]
    assert len(lines) == 1, lines
    assert "metrics.jsonl (" in lines[0]
    assert "tensorboard (" in lines[0] or "tensorboard: not installed (pip install tensorboard)" in lines[0]


def test_asking_for_wandb_without_it_is_a_config_error_before_any_folder(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` now fails as if not installed
    with pytest.raises(ConfigError) as caught:
        TrainingMachine(tiny_config(tmp_path, loggers=["wandb"]), total_steps=4, console=False)
    assert "run.loggers" in str(caught.value) and "pip install 'stackwise[wandb]'" in str(caught.value)
    assert not (tmp_path / "runs").exists()
    from stackwise.training.wandb_logger import WandbLogger

    with pytest.raises(ImportError, match="pip install"):
        WandbLogger()


def test_an_unknown_logger_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.loggers"):
        TrainingMachine(tiny_config(tmp_path, loggers=["mlflow"]), total_steps=4, console=False)


def wandb_records(path):
    """The records of an offline run's `run-ID.wandb` file (LevelDB log format of protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, records, pending, pos = path.read_bytes(), [], b"", 7  # 7-byte ':W&B' header
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        room = 32768 - pos % 32768
        if room < 7:  # block trailer
            pos += room
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def finished_wandb_records(path, timeout=30.0):
    """wandb's service may still be writing the file when `finish()` returns: wait for its exit record."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = wandb_records(path)
            if any(r.WhichOneof("record_type") == "exit" for r in records):
                return records
        except Exception:  # a half-written last record
            if time.monotonic() > deadline:
                raise
        assert time.monotonic() < deadline, f"{path}: no exit record after {timeout} s"
        time.sleep(0.1)


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install 'stackwise[wandb]')")
def test_the_wandb_logger_writes_an_offline_run(tmp_path, monkeypatch, capsys):
    for key, value in {"WANDB_MODE": "offline", "WANDB_SILENT": "true", "WANDB_CONSOLE": "off",
                       "WANDB_DIR": str(tmp_path / "wandb-default"), "WANDB_CACHE_DIR": str(tmp_path / "wandb-cache"),
                       "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"), "WANDB_DATA_DIR": str(tmp_path / "wandb-data")}.items():
        monkeypatch.setenv(key, value)
    config = tiny_config(tmp_path, loggers=["wandb"], wandb={"project": "tests"}, name="wb")
    result = TrainingMachine(config, total_steps=4, console=True).train()
    run_dir = Path(result.run_dir)
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("loggers:")]
    assert len(line) == 1 and f"wandb offline ({run_dir / 'wandb'})" in line[0]

    folders = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(folders) == 1
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    records = finished_wandb_records(folders[0] / f"run-{run_id}.wandb")

    def items(entries):
        return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in entries}

    history = [items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    losses = {h["step"]: h["train/loss"] for h in history if "train/loss" in h}
    assert losses == {s: pytest.approx(result.losses[s]) for s in (1, 2, 3)}  # logged: phase ends, every 3
    assert any("eval/val_bpb" in h for h in history)
    summary = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(items(r.summary.update))
    assert summary["final_train_loss"] == pytest.approx(result.final_train_loss)
    assert summary["steps"] == 4
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    logged_config = items(runs[0].config.update)
    assert logged_config["model"]["d_model"] == 32 and logged_config["run"]["loggers"] == ["wandb"]


def test_the_example_callback_in_docs_runs(tmp_path, capsys):
    text = (Path(__file__).resolve().parents[1] / "docs" / "events.md").read_text()
    example = [block for block in re.findall(r"```python\n(.*?)```", text, flags=re.S) if "class CsvLog" in block]
    namespace = {}
    exec(example[0], namespace)  # our own documentation
    csv_path = tmp_path / "losses.csv"
    TrainingMachine(tiny_config(tmp_path), total_steps=4, run_dir=False, console=False,
                    callbacks=[namespace["CsvLog"](csv_path)]).train()
    rows = csv_path.read_text().splitlines()
    assert rows[0] == "step,t,phase,loss,lr" and [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]
    assert "step 2: both -> top" in capsys.readouterr().out


def test_evaluating_a_run_opens_none_of_its_loggers(tmp_path, monkeypatch):
    result = TrainingMachine(tiny_config(tmp_path), total_steps=2, console=False).train()
    saved = Path(result.run_dir) / "config.yaml"
    saved.write_text(saved.read_text().replace("loggers: []", "loggers: [wandb]"))
    monkeypatch.setitem(sys.modules, "wandb", None)  # neither needed nor imported by eval / generate
    machine = TrainingMachine.for_evaluation(result.run_dir)
    assert machine.config.run.loggers == ["wandb"] and machine.events.callbacks == []
    assert machine.evaluate()["val_loss"] > 0
