"""Turn a sharded (DCP) checkpoint into the one-process format: model.safetensors + state.pt.

The result is a run directory of its own (config, tokenizer, metrics history and the one
checkpoint) that resumes in one process, or under torchrun with any number of ranks, and that
tools reading safetensors can open directly.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from stackwise.training.checkpoint import CheckpointError, CheckpointManager, load_checkpoint, model_tensors
from stackwise.training.machine import TrainingMachine
from stackwise.training.run_dir import RunDirectory

_RUN_FILES = ("config.yaml", "tokenizer.json", "metrics.jsonl")
_COMPUTED = ("sha256", "meta_sha256", "format_version", "step", "tied")  # written afresh


def consolidate(run_dir: str | os.PathLike[str], out_dir: str | os.PathLike[str],
                checkpoint: str | os.PathLike[str] | None = None) -> Path:
    """Write `checkpoint` (default: the run's newest good one) in the one-process format into a
    new run directory `out_dir`; returns the checkpoint folder written. The source run is only
    read; if writing fails (a full disk), what was made of `out_dir` is removed again."""
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise CheckpointError(f"{out_dir}: exists and is not empty; choose a new folder")
    source = Path(checkpoint) if checkpoint else _newest(run_dir)
    ckpt = load_checkpoint(source)
    machine = TrainingMachine.for_evaluation(run_dir, checkpoint=source)
    state = {k: v for k, v in ckpt.state.items() if k != "optimizer_layout"}
    optimizer = machine.optim.optimizer
    state["optimizer"] = optimizer.state_dict() if optimizer else {}
    tensors, tied = model_tensors(machine.model)
    meta = {**{k: v for k, v in ckpt.meta.items() if k not in _COMPUTED}, "tied": tied}
    target = RunDirectory.create(None, out_dir, "--out")  # checked, locked; removed again if anything fails
    try:
        for name in _RUN_FILES:
            if (run_dir / name).is_file():
                shutil.copy2(run_dir / name, out_dir / name)
        path = CheckpointManager(out_dir).save(ckpt.step, tensors, state, meta)
    except OSError as err:
        target.abandon()
        raise CheckpointError(f"{out_dir}: writing the consolidated run failed ({err})") from None
    except BaseException:
        target.abandon()
        raise
    target.release()
    return path


def _newest(run_dir: Path) -> Path:
    ckpt = CheckpointManager(run_dir).latest_good()
    if ckpt is None:
        raise CheckpointError(f"{run_dir}: no usable checkpoint to consolidate")
    return ckpt.path
