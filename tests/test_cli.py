"""The command line: train, plan, plot, eval, resume, and exit code 2 with one clear message."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stackwise.cli import main

ROOT = Path(__file__).resolve().parents[1]


def write_config(tmp_path, **overrides):
    cfg = {
        "model": {"d_model": 32, "n_heads": 2, "architecture": {"n_stacks": 1, "blocks_per_stack": 1}, "max_seq_len": 64},
        "training": {"batch_size": 4, "seq_len": 32, "total_steps": 10, "optimizer": {"lr": 3e-3}},
        "data": {},
        "schedule": [
            {"name": "one", "start_t": 0.0, "end_t": 0.5},
            {"name": "two", "start_t": 0.5, "end_t": 1.0,
             "model_config": {"grow": {"n": 1, "where": "append", "init": "identity"}, "trainable": "new"}},
        ],
        "run": {"dir": str(tmp_path / "runs"), "name": "cli", "eval_every": 5, "eval_batches": 1, "log_every": 5},
    }
    cfg.update(overrides)
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_writes_the_run_and_a_plot(tmp_path, capsys):
    assert main(["train", str(write_config(tmp_path))]) == 0
    out = capsys.readouterr().out
    run_dir = tmp_path / "runs" / "cli"
    assert f"run directory: {run_dir}" in out and f"plot: {run_dir / 'loss.png'}" in out
    assert (run_dir / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (run_dir / "config.yaml").exists() and (run_dir / "checkpoints").is_dir()
    kinds = [json.loads(line)["kind"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert kinds.count("transition") == 1 and "eval" in kinds and "checkpoint" in kinds


def test_overrides_on_the_command_line(tmp_path, capsys):
    assert main(["train", str(write_config(tmp_path)), "training.total_steps=4", "run.name=short"]) == 0
    assert "4 steps" in capsys.readouterr().out
    assert (tmp_path / "runs" / "short" / "loss.png").exists()


def test_resume_finishes_an_interrupted_run(tmp_path, capsys):
    from stackwise.training import TrainingMachine

    path = write_config(tmp_path)
    machine = TrainingMachine(path, console=False)
    for _ in range(6):
        machine.train_step()
    machine.save_checkpoint()
    machine.log.close()
    assert main(["train", "--resume", str(machine.run_dir)]) == 0
    assert "10 steps" in capsys.readouterr().out


def test_plan_prints_each_phase(tmp_path, capsys):
    assert main(["plan", str(write_config(tmp_path))]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:3] == ["phase", "t", "steps"]
    rows = [line.split() for line in lines[2:] if not line.startswith("training FLOPs:")]  # the table, not its totals
    assert [r[0] for r in rows] == ["one", "two"]
    assert [r[2] for r in rows] == ["0-5", "5-10"]  # each phase's [first, end) steps
    assert [r[6] for r in rows] == ["1", "2"]  # stacks: growth shows up in the plan


def test_plot_and_eval_of_a_finished_run(tmp_path, capsys):
    main(["train", str(write_config(tmp_path))])
    capsys.readouterr()
    run_dir = tmp_path / "runs" / "cli"
    out = tmp_path / "custom.png"
    assert main(["plot", str(run_dir), "--out", str(out)]) == 0 and out.exists()
    assert main(["eval", str(run_dir)]) == 0
    assert "bits/byte" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["train", "missing.yaml"], "missing.yaml"),
        (["plan", "{config}", "model.d_model=31"], "model.n_heads"),
        (["train", "{config}", "training.optimizer.lr=-1"], "training.optimizer.lr"),
        (["train", "{config}", "model.colour=red"], "model.colour"),
        (["train", "{config}", "data.paths=[nowhere.txt]"], "nowhere.txt"),
        (["train", "--resume", "{tmp}"], "nothing to resume"),
        (["plot", "{tmp}/none"], "no such run directory"),
        (["eval", "{tmp}"], "not a run directory"),
        (["plan", "{config}", "--steps", "1"], "schedule.1"),
    ],
)
def test_user_errors_exit_2_with_one_message(tmp_path, capsys, argv, needle):
    config = write_config(tmp_path)
    argv = [a.format(config=config, tmp=tmp_path) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err


def test_console_script_exit_code(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [\n")
    proc = subprocess.run([sys.executable, "-m", "stackwise", "train", str(bad)], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "bad.yaml" in proc.stderr and "Traceback" not in proc.stderr


def test_eval_with_another_objective(tmp_path, capsys):
    main(["train", str(write_config(tmp_path)), "data.objective=diffusion"])
    capsys.readouterr()
    run_dir = tmp_path / "runs" / "cli"
    assert main(["eval", str(run_dir), "--mask-range", "0.5", "0.5"]) == 0
    half = float(capsys.readouterr().out.split()[2].rstrip(","))
    assert main(["eval", str(run_dir), "--mask-range", "0.9", "0.9"]) == 0
    ninety = float(capsys.readouterr().out.split()[2].rstrip(","))
    assert half != ninety
    assert main(["eval", str(run_dir), "--mask-range", "0.9", "0.1"]) == 2
