"""Training: time and phases, the data loader, and the one engine that runs them."""

from typing import Any

from stackwise.training.callbacks import Callback, RunView
from stackwise.training.loader import ProgressiveDataLoader
from stackwise.training.progressive import ProgressiveRackBuilder, ProgressiveTrainer
from stackwise.training.schedule import Phase, PhaseSchedule, TimeController

__all__ = [
    "Callback",
    "Phase",
    "PhaseSchedule",
    "ProgressiveDataLoader",
    "ProgressiveRackBuilder",
    "ProgressiveTrainer",
    "RunView",
    "TimeController",
    "TrainResult",
    "TrainingMachine",
    "WandbLogger",
]

# Imported on first use: the machine pulls in most of the package (and torch.distributed), which
# `import stackwise.training` alone should not pay for.
_LAZY = {
    "TrainingMachine": "stackwise.training.machine",
    "TrainResult": "stackwise.training.machine",
    "WandbLogger": "stackwise.training.wandb_logger",  # imports wandb only when one is made
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'stackwise.training' has no attribute {name!r}")
