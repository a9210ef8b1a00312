"""The small two-phase growth config the reliability tests run, killed, forge and resume."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def growth_config(runs: Path, name: str = "run", steps: int = 12, split: float = 0.5, **run: Any) -> dict[str, Any]:
    """d_model 32, one block; phase 'one' until t=`split`, then phase 'two' appends an identity
    stack that trains alone on a frozen trunk (untied: a tied embedding would train with its head).
    Run directories go to `runs`/`name`."""
    return {
        "model": {"d_model": 32, "n_heads": 2, "max_seq_len": 32, "tie_embeddings": False,
                  "architecture": {"n_stacks": 1, "blocks_per_stack": 1}},
        "training": {"batch_size": 4, "seq_len": 32, "total_steps": steps, "optimizer": {"lr": 3e-3}},
        "data": {},
        "schedule": [
            {"name": "one", "start_t": 0.0, "end_t": split},
            {"name": "two", "start_t": split, "end_t": 1.0,
             "model_config": {"grow": {"n": 1, "where": "append", "init": "identity"}, "trainable": "new"}},
        ],
        "run": {"dir": str(runs), "name": name, "eval_every": 1000, "eval_batches": 1, "log_every": 1, **run},
    }


WORDS = ["stack", "rack", "phase", "model", "data", "time", "grow", "frozen", "cache", "trunk", "head", "embed",
         "learn", "token", "block", "layer", "train", "step", "rate", "mask", "loss", "curve"]


def write_small_corpus(folder: Path) -> Path:
    """24 short documents (about 120 windows of 33 bytes), so that epochs wrap within a short run."""
    for i in range(24):
        words = [WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(36)]
        (folder / f"doc{i:02d}.txt").write_text(" ".join(words) + ".\n")
    return folder


def cli(argv: list[str], capsys: Any) -> tuple[int, str, str]:
    """`stackwise ARGV` in-process: (exit code, stdout, stderr)."""
    from stackwise.cli import main

    try:
        code = main(argv)
    except SystemExit as exit_:
        code = exit_.code
    out, err = capsys.readouterr()
    return code, out, err


def wait_for(predicate: Any, proc: Any, timeout: float = 60.0, interval: float = 0.01) -> bool:
    """Poll `predicate` until it holds (True), or `proc` exits or `timeout` passes (False)."""
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        if proc.poll() is not None:
            return False
        time.sleep(interval)
    return False
