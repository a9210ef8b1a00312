"""Adapters: each plane as the TrainingMachine sees it, with one method to enter a phase.

- `DataAdapter` wraps a data loader (the built-in one, or your own iterable of token-id batches
  with a BatchSpec): configures it per phase, hands out the batch of a step.
- `ModelAdapter` wraps a `StackWiseModel`: applies a phase's model plane (growth, roles).
- `OptimizerAdapter` owns the optimizer: rebuilds it over the trainable parameters at each phase,
  carrying state over by parameter name, and sets the learning rate at each step's t (a phase's
  shape at its local time τ, a run-wide shape at t; docs/schedule.md).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Iterator, Mapping
from typing import Any

import torch

from stackwise.config import OptimizerConfig, StackWiseConfig
from stackwise.data.batch import Batch
from stackwise.data.errors import DataError
from stackwise.model import StackWiseModel
from stackwise.specs import BatchSpec, ModelSpec, OptimizerSpec
from stackwise.training.loader import ProgressiveDataLoader
from stackwise.training.optimizer import build_optimizer, optimizer_spec, set_lr
from stackwise.training.progressive import apply_model_phase, stack_parameter_names
from stackwise.training.schedule import (
    Phase,
    data_orders,
    new_params_warmup,
    phase_lr,
    resolve_data,
    resolve_optimizer,
)
from stackwise.training.user_data import UserData


class DataAdapter:
    """The data plane: a loader whose settings follow the active phase.

    `DataAdapter(loader, config)` drives a `ProgressiveDataLoader` (the built-in corpora).
    `DataAdapter(ITERABLE, batch_spec)` (or `DataAdapter(ITERABLE, config)`) wraps your own
    DataLoader / IterableDataset / generator of token-id batches (training/user_data.py,
    docs/data.md "Your own data"); `user_options` (val_data, tokenizer, mask_id, on_resume) go to
    `UserData`. `batch(step, tau)` hands out a step's `Batch` either way.
    `total_steps` (the run's length; the machine gives it): phases on the same corpus continue one
    window order with a run-wide sample counter (`schedule.data_orders`); without it each phase
    draws its own order from its start.
    """

    def __init__(
        self,
        loader: ProgressiveDataLoader | UserData | Iterable[Any],
        config: StackWiseConfig | BatchSpec | None = None,
        rank: int = 0,
        world_size: int = 1,
        *,
        total_steps: int | None = None,
        **user_options: Any,
    ):
        spec = config if isinstance(config, BatchSpec) else None
        if not isinstance(loader, (ProgressiveDataLoader, UserData)):
            loader = UserData(loader, spec, **user_options)
        elif user_options:
            raise TypeError(f"{', '.join(user_options)}: options of your own data, given with a ready "
                            f"{type(loader).__name__}; give them when building it")
        if isinstance(loader, UserData):
            cfg = config if isinstance(config, StackWiseConfig) else None
            if cfg is not None or not loader.bound or (rank, world_size) != (loader.rank, loader.world_size):
                loader.bind(cfg, rank, world_size)
            config = cfg if cfg is not None else _config_of(loader.spec)
        elif config is None or isinstance(config, BatchSpec):
            config = loader.config
        self.loader = loader
        self.config = config
        self.rank, self.world_size = rank, world_size  # a distributed run: this rank's slice of each batch
        self.phase_start_step = 0
        self.settings: dict[str, Any] = {}
        # Your own data is one stream read in order: only the built-in loader draws window orders.
        use_orders = total_steps is not None and isinstance(loader, ProgressiveDataLoader)
        self._orders = data_orders(self.config, total_steps) if use_orders else None

    @property
    def vocab_size(self) -> int:
        return self.loader.vocab_size

    @property
    def tokenizer(self) -> Any:
        return self.loader.tokenizer

    @property
    def user(self) -> UserData | None:
        """Your own data (`data=ITERABLE`), or None for the built-in loader."""
        return self.loader if isinstance(self.loader, UserData) else None

    @property
    def has_validation(self) -> bool:
        return self.user is None or self.user.has_validation

    @property
    def knows_bytes(self) -> bool:
        """Whether validation can report bits per byte (always for built-in data; for your own
        data only when a tokenizer is known)."""
        return self.user is None or self.user.knows_bytes

    @property
    def cache_off_reason(self) -> str | None:
        return self.user.cache_off_reason if self.user is not None else None

    def enter_phase(self, phase: Phase, phase_index: int, start_step: int) -> None:
        """Configure the stream for a phase (a new corpus keeps the run's tokenizer). Ramps stay
        ramps: the loader evaluates them at each step's τ."""
        self.settings = {**resolve_data(self.config, phase, tau=None), "phase_index": phase_index}
        if self._orders is not None:
            order, offset = self._orders[phase_index]
            self.settings.update(order=order, order_offset=offset)
        if self.user is not None and (phase.data.paths is not None or phase.data.text_field is not None):
            raise DataError(f"phase {phase.name!r} names a corpus (data_config.paths/text_field), but the run trains "
                            "on your own data (data=...): one stream feeds every phase; drop those keys")
        self.loader.configure(**self.settings)
        self.phase_start_step = start_step

    def batch(self, step: int, tau: float) -> Batch:
        return self.loader.batch_at(step, tau=tau, phase_start_step=self.phase_start_step,
                                    rank=self.rank, world_size=self.world_size)

    def __iter__(self) -> Iterator[Batch]:
        return iter(self.loader)

    def validation(self, max_batches: int) -> Any:
        return self.loader.validation_batches(max_batches)

    def spec(self) -> BatchSpec:
        return self.loader.get_batch_spec()

    # ---- checkpoints: where your own data's stream stands ------------------------------------

    def state_dict(self) -> dict[str, Any] | None:
        """The stream's position for a checkpoint (None for built-in data: a pure function of
        the step). Under torchrun every rank's state is gathered (a collective call)."""
        if self.user is None:
            return None
        mine = self.user.state_dict()
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            ranks: list[Any] = [None] * self.world_size
            torch.distributed.all_gather_object(ranks, mine)
            return {"kind": "user", "ranks": ranks}
        return {"kind": "user", "ranks": [mine]}

    def load_state_dict(self, state: Mapping[str, Any] | None) -> None:
        """Put the stream where a checkpoint left it; what was done is `resume_note()`."""
        self._note: dict[str, Any] | None = None
        self._refusal: str | None = None
        if self.user is None:
            if state:
                self._refusal = ("this run trained on your own data (data=...): pass the same data to "
                                 "TrainingMachine(..., data=..., resume=...) to resume it")
            return
        if not state:
            self._note = self.user.load_state_dict(None)
            return
        ranks = state["ranks"]
        if not isinstance(ranks, list):
            raise TypeError("data.ranks: expected a list of per-rank states")
        if len(ranks) == self.world_size:
            self._note = self.user.load_state_dict(ranks[self.rank])
        else:  # another number of ranks: the per-rank loader states do not map; every rank read as many
            first = {k: v for k, v in ranks[0].items() if k != "loader"} if ranks and isinstance(ranks[0], Mapping) \
                else None
            self._note = self.user.load_state_dict(first)
            self._note = {**self._note, "message": f"{self._note['message']} (the run had {len(ranks)} ranks, now "
                                                   f"{self.world_size}: loader states are per rank)"}

    def resume_note(self) -> dict[str, Any] | None:
        """After `load_state_dict`: what resuming did to your own data's stream (to be said)."""
        return getattr(self, "_note", None)

    def resume_refusal(self) -> str | None:
        """After `load_state_dict`: why this adapter cannot continue the checkpoint's run."""
        return getattr(self, "_refusal", None)


def _config_of(spec: BatchSpec) -> StackWiseConfig:
    """A config whose base data settings are those of a BatchSpec (a DataAdapter built without one)."""
    data: dict[str, Any] = {"objective": spec.objective}
    if spec.mask_rate is not None:
        data["mask_rate"] = spec.mask_rate
    return StackWiseConfig.from_dict({"model": {"vocab_size": spec.vocab_size},
                                      "training": {"batch_size": spec.batch_size, "seq_len": spec.seq_len},
                                      "data": data})


class ModelAdapter:
    """The model plane: a StackWiseModel whose structure and roles follow the active phase."""

    def __init__(self, model: StackWiseModel, config: StackWiseConfig):
        self.model = model
        self.config = config
        self.trunk_version = 0  # bumped by any change below the trainable stacks (invalidates caches)
        self.new_parameters: set[str] = set()  # names of the parameters the last phase entered added
        # {new parameter: parameter it was copied from} when that phase's grow copies optimizer state
        self.state_sources: dict[str, str] = {}

    def enter_phase(self, phase: Phase, phase_index: int) -> bool:
        """Grow and set roles for a phase. Returns True when structure or roles changed."""
        before = self.model.to_spec()
        growth = apply_model_phase(self.model, phase.model, phase_index, self.config)
        self.new_parameters = stack_parameter_names(self.model, growth.positions)
        grow = phase.model.grow
        self.state_sources = growth.sources if grow is not None and grow.optimizer_state == "copy" else {}
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
        self.phase: Phase | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    def enter_phase(self, model: torch.nn.Module, phase: Phase, new_parameters: Collection[str] = (),
                    state_sources: Mapping[str, str] | None = None) -> torch.optim.Optimizer:
        """Rebuild for `phase`; `new_parameters` (names) are those the phase added, which warm up
        on their own when the phase sets `warmup_new`; `state_sources` maps new parameters to the
        parameters whose optimizer state they start with (`grow.optimizer_state: copy`)."""
        self.cfg, self.phase = resolve_optimizer(self.base, phase), phase
        self.optimizer = build_optimizer(model, self.cfg, previous=self.optimizer, lr=phase_lr(self.cfg, phase, phase.start_t),
                                         new=new_parameters, state_sources=state_sources)
        return self.optimizer

    def lr_at(self, t: float) -> float:
        """The base lr at run time t in the current phase (before lr_scale and new-parameter warmup)."""
        return phase_lr(self.cfg, self.phase, t)

    def set_lr(self, t: float) -> float:
        """Set every group's lr for the step at run time t; returns the base lr (what is logged)."""
        lr = self.lr_at(t)
        set_lr(self.optimizer, lr, new_factor=new_params_warmup(self.cfg, self.phase, t))
        return lr

    def spec(self) -> OptimizerSpec:
        return optimizer_spec(self.optimizer, self.cfg)
