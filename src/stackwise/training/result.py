"""What a TrainingMachine reports: the transitions it made, its current planes, its result."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from stackwise.model import StackWiseModel
from stackwise.training.adapters import DataAdapter


@dataclass
class Transition:
    step: int
    t: float
    from_phase: str
    to_phase: str


@dataclass
class Planes:
    """The current triplet (Data_t, Model_t, Optimizer_t)."""

    data: DataAdapter
    model: StackWiseModel
    optimizer: torch.optim.Optimizer


@dataclass
class TrainResult:
    final_train_loss: float
    final_val_loss: float | None
    final_val_bpb: float | None
    tokens_seen: int
    steps: int
    wall_time: float
    transitions: list[Transition] = field(default_factory=list)
    run_dir: str | None = None
    losses: list[float] = field(default_factory=list)
    stopped: str | None = None  # the signal that stopped the run early (SIGTERM, SIGINT), if any
    nothing_to_do: bool = False  # a finished run was resumed: nothing ran, no file was touched

    def __getitem__(self, key: str) -> Any:
        return getattr(self, key)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out.pop("losses")
        return out
