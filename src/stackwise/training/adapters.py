"""Adapters: each plane as the TrainingMachine sees it, with one method to enter a phase.

- `DataAdapter` wraps a data loader: configures it per phase, hands out the batch of a step.
- `ModelAdapter` wraps a `StackWiseModel`: applies a phase's model plane (growth, roles).
- `OptimizerAdapter` owns the optimizer: rebuilds it over the trainable parameters at each phase,
  carrying state over by parameter name, and sets the learning rate at local time τ.
"""

from __future__ import annotations

from typing import Any

import torch

from stackwise.config import OptimizerConfig, StackWiseConfig, value_at
from stackwise.data.batch import Batch
from stackwise.model import StackWiseModel
from stackwise.specs import BatchSpec, ModelSpec, OptimizerSpec
from stackwise.training.loader import ProgressiveDataLoader
from stackwise.training.optimizer import build_optimizer, optimizer_spec, set_lr
from stackwise.training.progressive import apply_model_phase
from stackwise.training.schedule import Phase, resolve_data, resolve_optimizer


class DataAdapter:
    """The data plane: a loader whose settings follow the active phase."""

    def __init__(self, loader: ProgressiveDataLoader, config: StackWiseConfig, rank: int = 0, world_size: int = 1):
        self.loader = loader
        self.config = config
        self.rank, self.world_size = rank, world_size  # a distributed run: this rank's slice of each batch
        self.phase_start_step = 0
        self.settings: dict[str, Any] = {}

    @property
    def vocab_size(self) -> int:
        return self.loader.vocab_size

    @property
    def tokenizer(self) -> Any:
        return self.loader.tokenizer

    def enter_phase(self, phase: Phase, phase_index: int, start_step: int) -> None:
        """Configure the stream for a phase (a new corpus keeps the run's tokenizer). Ramps stay
        ramps: the loader evaluates them at each step's τ."""
        self.settings = {**resolve_data(self.config, phase, tau=None), "phase_index": phase_index}
        self.loader.configure(**self.settings)
        self.phase_start_step = start_step

    def batch(self, step: int, tau: float) -> Batch:
        return self.loader.batch_at(step, tau=tau, phase_start_step=self.phase_start_step,
                                    rank=self.rank, world_size=self.world_size)

    def validation(self, max_batches: int) -> Any:
        return self.loader.validation_batches(max_batches)

    def spec(self) -> BatchSpec:
        return self.loader.get_batch_spec()


class ModelAdapter:
    """The model plane: a StackWiseModel whose structure and roles follow the active phase."""

    def __init__(self, model: StackWiseModel, config: StackWiseConfig):
        self.model = model
        self.config = config
        self.trunk_version = 0  # bumped by any change below the trainable stacks (invalidates caches)

    def enter_phase(self, phase: Phase, phase_index: int) -> bool:
        """Grow and set roles for a phase. Returns True when structure or roles changed."""
        before = self.model.to_spec()
        apply_model_phase(self.model, phase.model, phase_index, self.config)
        after = self.model.to_spec()
        changed = before != after
        if changed:
            self.trunk_version += 1
        return changed

    def spec(self) -> ModelSpec:
        return self.model.to_spec()


class OptimizerAdapter:
    """The optimizer plane: rebuilt over exactly the trainable parameters at each phase."""

    def __init__(self, config: OptimizerConfig):
        self.base = config
        self.cfg = config
        self.optimizer: torch.optim.Optimizer | None = None

    def enter_phase(self, model: torch.nn.Module, phase: Phase) -> torch.optim.Optimizer:
        self.cfg = resolve_optimizer(self.base, phase)
        self.optimizer = build_optimizer(model, self.cfg, previous=self.optimizer)
        return self.optimizer

    def lr_at(self, tau: float) -> float:
        return value_at(self.cfg.lr, tau)

    def set_lr(self, tau: float) -> float:
        lr = self.lr_at(tau)
        set_lr(self.optimizer, lr)
        return lr

    def spec(self) -> OptimizerSpec:
        return optimizer_spec(self.optimizer, self.cfg)
