"""Turn a sharded (DCP) checkpoint into the one-process format: model.safetensors + state.pt.

The result is a run directory of its own (config, tokenizer, metrics history and the one
checkpoint) that resumes in one process, or under torchrun with any number of ranks, and that
tools reading safetensors can open directly.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from stackwise.model.lora import flat_state
from stackwise.training.checkpoint import CheckpointError, CheckpointManager, load_checkpoint
from stackwise.training.machine import TrainingMachine

_RUN_FILES = ("config.yaml", "tokenizer.json", "metrics.jsonl")
_COMPUTED = ("sha256", "meta_sha256", "format_version", "step")  # CheckpointManager writes these afresh


def consolidate(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                checkpoint: str | os.PathLike[str] | None = None) -> Path:
    """Write `checkpoint` (default: the run's newest good one) in the one-process format into a
    new run directory `out_dir`; returns the checkpoint folder written."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir}: exists and is not empty; choose a new folder")
    source = Path(checkpoint) if checkpoint else _newest(run_dir)
    ckpt = load_checkpoint(source)
    machine = TrainingMachine.for_evaluation(run_dir, checkpoint=source)
    state = {k: v for k, v in ckpt.state.items() if k != "optimizer_layout"}
    optimizer = machine.optim.optimizer
    state["optimizer"] = optimizer.state_dict() if optimizer else {}
    meta = {k: v for k, v in ckpt.meta.items() if k not in _COMPUTED}
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in _RUN_FILES:
        if (run_dir / name).is_file():
            shutil.copy2(run_dir / name, out_dir / name)
    return CheckpointManager(out_dir).save(ckpt.step, flat_state(machine.model), state, meta)


def _newest(run_dir: Path) -> Path:
    ckpt = CheckpointManager(run_dir).latest_good()
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no usable checkpoint to consolidate")
    return ckpt.path
