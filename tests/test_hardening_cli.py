"""Hardening, command line: messages in the user's words, and outputs refused before any work.

Options among overrides (`plan cur.yaml --steps 20 run.name=x`), counts and numbers that make no
sense (`eval --batches -1`, `generate --temperature nan`), Ctrl-C in the first moments (exit 130,
one line), `plot --out` and `consolidate --out` where nothing can be written, and SpecErrors that
name the config key. Each: exit 2 (or 130), no traceback, the flag or path named, nothing created.
"""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from stackwise.specs import BatchSpec, OptimizerSpec, SpecError
from tests.runs import cli

CONFIG = {
    "model": {"d_model": 32, "n_heads": 2, "vocab_size": 300, "max_seq_len": 64,
              "architecture": {"n_stacks": 1, "blocks_per_stack": 1}},
    "training": {"batch_size": 4, "seq_len": 32, "total_steps": 4},
    "data": {"use_dummy_data": True},
}


@pytest.fixture
def config(tmp_path) -> Path:
    path = tmp_path / "cur.yaml"
    path.write_text(yaml.safe_dump({**CONFIG, "run": {"dir": str(tmp_path / "runs")}}))
    return path


@pytest.fixture
def fake_run(tmp_path) -> Path:
    """A folder that passes the `config.yaml` test of eval/consolidate: the refusals under test
    come before anything reads it."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    return run


def listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def unwritable_folder(tmp_path: Path) -> Path | None:
    """A folder this process cannot create anything in (root ignores permission bits, so try a
    read-only kernel file system first), or None."""
    candidates = [Path("/sys"), Path("/proc")]
    if os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o555)
        candidates.insert(0, locked)
    for folder in candidates:
        try:
            os.rmdir(tempfile.mkdtemp(dir=folder))
        except OSError:
            return folder
    return None


# ---- options anywhere among the overrides -----------------------------------------------------------


def test_options_may_come_between_the_config_and_the_overrides(config, capsys, tmp_path):
    code, out, err = cli(["plan", str(config), "--steps", "20", "run.name=x", "--no-data"], capsys)
    assert code == 0, err
    assert " 0-20 " in out.splitlines()[2]  # the phase row: steps [0, 20)
    code, out, err = cli(["plan", "--no-data", str(config), "training.total_steps=7"], capsys)
    assert code == 0 and " 0-7 " in out.splitlines()[2], err
    # train: the override is read (and refused for its value), not rejected as an unknown argument
    for argv, key in [(["train", str(config), "--steps", "3", "training.lr=.nan"], "training.optimizer.lr"),
                      (["train", "--steps", "3", str(config), "model.d_model.x=1"], "model.d_model"),
                      (["train", str(config), "--steps", "3", "run.threads=100000"], "run.threads")]:
        code, _, err = cli(argv, capsys)
        assert code == 2 and key in err and "unrecognized" not in err and "Traceback" not in err, (argv, err)
    assert not (tmp_path / "runs").exists()
    code, _, err = cli(["plan", str(config), "--bogus"], capsys)  # a real unknown option is still one
    assert code == 2 and "--bogus" in err


# ---- counts and numbers -------------------------------------------------------------------------------


@pytest.mark.parametrize("batches", ["-1", "0"])
def test_eval_refuses_a_non_positive_batch_count(fake_run, capsys, batches):
    before = listing(fake_run)
    code, _, err = cli(["eval", str(fake_run), "--batches", batches], capsys)
    assert code == 2 and "--batches" in err and "Traceback" not in err, err
    assert listing(fake_run) == before


@pytest.mark.parametrize(("flag", "value"), [
    ("--temperature", "nan"), ("--temperature", "inf"), ("--temperature", "-inf"), ("--temperature", "-1"),
    ("--seed", str(2**70)), ("--seed", "-1"), ("--max-new-tokens", str(10**9)), ("--top-k", "0"),
])
def test_generate_refuses_numbers_that_make_no_sense(fake_run, capsys, flag, value):
    before = listing(fake_run)
    code, _, err = cli(["generate", str(fake_run), "--prompt", "x", flag, value], capsys)
    assert code == 2 and flag in err and "Traceback" not in err, err
    assert listing(fake_run) == before


def test_sampling_refuses_a_non_finite_temperature():
    import torch

    from stackwise.model.sampling import sample_tokens

    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError, match="finite"):
            sample_tokens(torch.zeros(1, 4), temperature=bad, top_k=None, banned=torch.zeros(4, dtype=torch.bool),
                          generator=torch.Generator())


# ---- Ctrl-C from the very start -------------------------------------------------------------------------


def long_config(tmp_path) -> Path:
    """A run far longer than any test waits: only a signal ends it early."""
    path = tmp_path / "long.yaml"
    body = {**CONFIG, "training": {**CONFIG["training"], "total_steps": 100_000}, "run": {"dir": str(tmp_path / "runs")}}
    path.write_text(yaml.safe_dump(body))
    return path


def interrupted(command: list[str], tmp_path: Path, delay: float) -> None:
    """Ctrl-C `delay` seconds after start: during the imports it is exit 130 with one line; once
    the run is training it is the graceful stop (exit 0, a checkpoint). Never a traceback."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    # A shell without job control starts background commands with SIGINT ignored, and a child
    # inherits that (CI may run the suite so): the child gets Ctrl-C as a terminal would send it.
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    time.sleep(delay)
    process.send_signal(signal.SIGINT)
    try:
        out, err = process.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        process.kill()
        out, err = process.communicate()
        pytest.fail(f"Ctrl-C at {delay}s did not end the run: {err[-1000:]}")
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-2000:]
    # Exit 130, or (rarely, when the signal lands in the interpreter's own start-up or teardown)
    # death by SIGINT after the same line: a shell reports both as 130.
    if process.returncode in (130, -signal.SIGINT):
        assert err.strip().splitlines()[-1] == "stackwise: interrupted", err[-2000:]
    else:
        assert process.returncode == 0 and "stopped by SIGINT" in out, (process.returncode, out[-1000:], err[-1000:])


@pytest.mark.parametrize("delay", [0.15, 0.3, 1.0])
def test_ctrl_c_in_the_first_moments_never_gives_a_traceback(tmp_path, delay):
    interrupted([sys.executable, "-m", "stackwise", "train", str(long_config(tmp_path))], tmp_path, delay)


def test_the_console_script_guards_its_imports_too(tmp_path):
    script = Path(sys.executable).with_name("stackwise")
    if not script.exists():
        pytest.skip("no console script in this environment")
    interrupted([str(script), "train", str(long_config(tmp_path))], tmp_path, 0.3)


def test_ctrl_c_while_the_command_imports_is_one_line_and_130(monkeypatch, capsys):
    # The same moment without a race: the command's own imports are interrupted.
    import stackwise.cli as cli_module

    def interrupted_import(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli_module, "_main", interrupted_import)
    assert cli_module.main(["train"]) == 130
    assert capsys.readouterr().err == "stackwise: interrupted\n"


# ---- outputs that cannot be written -----------------------------------------------------------------------


def test_plot_out_is_checked_before_drawing(tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [
        (tmp_path / "missing" / "loss.png", "does not exist"),
        (tmp_path / "loss.txt", "not an image format"),
        (tmp_path / "loss", "no suffix"),
        (tmp_path / "loss.exe", "not an image format"),
        (run, "not an image format"),  # a folder (no suffix either)
        (a_file / "loss.png", "not a folder"),
    ]
    locked = unwritable_folder(tmp_path)
    if locked is not None:
        cases.append((locked / "loss.png", "cannot write"))
    before = listing(tmp_path)
    for out, cause in cases:
        code, _, err = cli(["plot", str(run), "--out", str(out)], capsys)
        assert code == 2 and str(out) in err and cause in err and "Traceback" not in err, (out, err)
    assert listing(tmp_path) == before


def test_consolidate_out_is_checked_before_any_work(fake_run, tmp_path, capsys):
    a_file = tmp_path / "file.txt"
    a_file.write_text("x")
    cases = [(tmp_path / "missing" / "new_run", "does not exist"), (a_file / "new_run", "not a folder")]
    locked = unwritable_folder(tmp_path)
    if locked is not None:
        cases.append((locked / "new_run", "cannot write"))
    before = listing(tmp_path)
    for out, cause in cases:
        code, _, err = cli(["consolidate", str(fake_run), "--out", str(out)], capsys)
        assert code == 2 and str(out) in err and cause in err and "Traceback" not in err, (out, err)
    assert listing(tmp_path) == before


# ---- internal names translated ---------------------------------------------------------------------------


def test_spec_errors_name_the_config_key_first():
    cases = [
        (OptimizerSpec(lr=math.nan), "training.optimizer.lr"),
        (OptimizerSpec(betas=(2.0, 3.0)), "training.optimizer.betas"),
        (BatchSpec(4, 8, 10, "mlm", "bidirectional", 5.0), "data.mask_rate"),
        (BatchSpec(0, 8, 10), "training.batch_size"),
    ]
    for spec, key in cases:
        with pytest.raises(SpecError) as err:
            spec.validate()
        text = str(err.value)
        assert text.startswith(key) or f"  {key}" in text, text
        assert type(spec).__name__ in text  # the spec field stays named, after the config key
