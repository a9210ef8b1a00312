"""Progressive growth: the model plane of a phase, and the front door that grows a rack.

`apply_model_phase` is what `ModelAdapter.enter_phase` runs at each phase start (DESIGN.md
section 5, step 2):

1. grow: `n` new stacks, appended (next to the head) or prepended (next to the embedding),
   initialised `random`, as a `copy` of the neighbouring stack, or as an `identity` (random with
   the residual-writing projections zeroed, so the model's function is unchanged);
2. roles: the stacks chosen by `trainable` train; the others (the trunk) are `frozen`, adapted
   (`qlora`: LoRA adapters over a frozen base stored in `trunk_precision`, NF4 by default) or
   `trainable`; the embedding and head follow `embedding` / `head`.

`ProgressiveRackBuilder` owns a model and offers the same operations by hand;
`ProgressiveTrainer.train_rack` turns "grow to K stacks" into a curriculum of one phase per stack
and runs it on the one engine, the TrainingMachine.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch

from stackwise.config import ConfigError, LoraConfig, PhaseModelConfig, StackWiseConfig
from stackwise.model import Stack, StackWiseModel
from stackwise.model.lora import add_adapters, attach_lora, lora_layers, merge_lora, merge_lora_
from stackwise.specs import RackSpec

# ---- the model plane of a phase -----------------------------------------------------------------


def apply_model_phase(model: StackWiseModel, plane: PhaseModelConfig, phase_index: int, config: StackWiseConfig) -> None:
    new_positions = add_stacks(model, plane.grow.n, plane.grow.where, plane.grow.init) if plane.grow else []
    chosen = trainable_positions(len(model.rack), plane.trainable, new_positions, phase_index)
    set_roles(model, chosen, plane)


def add_stacks(model: StackWiseModel, n: int, where: str = "append", init: str = "random") -> list[int]:
    """Add `n` stacks; returns their rack positions after growth."""
    rack = model.rack
    positions: list[int] = []
    for _ in range(n):
        neighbour = rack[-1] if where == "append" else rack[0]
        stack = _new_stack(model, neighbour, init)
        position = len(rack) if where == "append" else 0
        rack.insert(position, stack)
        positions = [p + (1 if where == "prepend" else 0) for p in positions] + [position]
    return sorted(positions)


def _new_stack(model: StackWiseModel, neighbour: Stack, init: str) -> Stack:
    device = model.embedding.tokens.weight.device
    if init == "copy" and not lora_layers(neighbour):
        # The stacking operator of the growth literature: the new stack starts as its neighbour.
        stack = copy.deepcopy(neighbour)
        stack._compiled_call_impl = None  # a compiled forward would still call the neighbour
    elif init == "copy":
        stack = merge_lora(neighbour)  # a dense fp32 copy of an adapted or NF4 neighbour
    else:
        stack = Stack(model.cfg, n_blocks=len(neighbour)).to(device)
        if init == "identity":
            with torch.no_grad():
                for block in stack.blocks:
                    for proj in block.output_projections():
                        proj.weight.zero_()
    stack.unfreeze()
    stack.precision = "fp32"
    return stack


def trainable_positions(n_stacks: int, selector: str | list[int], new_positions: list[int], phase_index: int) -> list[int]:
    """Rack positions chosen by `trainable`: new | all | last:K | [indices]."""
    field = f"schedule.{phase_index}.model_config.trainable"
    if selector == "all":
        return list(range(n_stacks))
    if selector == "new":
        if not new_positions:
            raise ConfigError([(field, "is 'new' but the phase grows no stack", selector)])
        return new_positions
    if isinstance(selector, str):  # last:K (validated by the config)
        k = int(selector.split(":")[1])
        if k > n_stacks:
            raise ConfigError([(field, f"asks for {k} stacks, the rack has {n_stacks}", selector)])
        return list(range(n_stacks - k, n_stacks))
    bad = [i for i in selector if not -n_stacks <= i < n_stacks]
    if bad:
        raise ConfigError([(field, f"positions {bad} are outside a rack of {n_stacks} stacks", selector)])
    return sorted({i % n_stacks for i in selector})


def set_roles(model: StackWiseModel, chosen: list[int], plane: PhaseModelConfig) -> None:
    for position, stack in enumerate(model.rack):
        if position in chosen or plane.trunk == "trainable":
            make_trainable(stack, plane.stack_precision.get(position, "fp32"))
        elif plane.trunk == "qlora":
            adapt(stack, plane.lora, plane.trunk_precision)
        else:
            freeze(stack, plane.trunk_precision)
    bottom_in_trunk = 0 not in chosen and plane.trunk != "trainable"
    embedding_trains = plane.embedding == "trainable" or (plane.embedding == "auto" and not bottom_in_trunk)
    model.head.requires_grad_(plane.head == "trainable")
    # With tied weights the shared matrix follows the embedding: it feeds the trunk, and a
    # trunk whose input moves could not be cached.
    model.embedding.requires_grad_(embedding_trains)


def make_trainable(stack: Stack, precision: str = "fp32") -> None:
    if lora_layers(stack):
        merge_lora_(stack)  # adapters and NF4 bases folded into dense fp32 weights that train
    stack.unfreeze()
    _cast(stack, precision)


def freeze(stack: Stack, precision: str | None = "fp32") -> None:
    """Freeze a stack; `precision` is its storage (nf4 quantizes every linear weight)."""
    precision = precision or "fp32"
    if stack.role == "frozen" and stack.precision == precision:
        return  # already so: re-quantizing an NF4 stack would only lose more
    if lora_layers(stack):
        merge_lora_(stack)
    stack.freeze()
    if precision == "nf4":
        attach_lora(stack, targets=[], rank=0, alpha=1.0, base_precision="nf4")
        stack.freeze()
        stack.precision = "nf4"
    else:
        _cast(stack, precision)


def adapt(stack: Stack, lora: LoraConfig, precision: str | None) -> None:
    """LoRA adapters over a frozen base stored in `precision` (NF4 unless told otherwise: that is
    the Q of QLoRA); a stack already adapted stays as it is, adapters and all."""
    if stack.role == "adapted":
        return
    base = precision or "nf4"
    if stack.role == "frozen" and stack.precision == base and lora_layers(stack):
        # Frozen in NF4 already: adapters go on the existing 4-bit bases.
        add_adapters(stack, lora.targets, lora.rank, lora.alpha, lora.dropout)
    else:
        if lora_layers(stack):
            merge_lora_(stack)
        stack.freeze()
        attach_lora(stack, targets=lora.targets, rank=lora.rank, alpha=lora.alpha, dropout=lora.dropout, base_precision=base)
    stack.role = "adapted"
    stack.precision = base


def _cast(stack: Stack, precision: str) -> None:
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]
    stack.to(dtype)
    stack.precision = precision


def with_growth_schedule(config: StackWiseConfig) -> StackWiseConfig:
    """A config without a schedule but with `training.progressive.target_stacks` above its
    starting stack count describes a growth run: spell out its curriculum (one phase per stack,
    as `ProgressiveTrainer` builds it) so that every path runs the same phases."""
    target = config.training.progressive.target_stacks
    start = config.model.architecture.n_stacks
    if config.schedule is not None or target is None or target <= start:
        return config
    data = config.to_dict()
    data["schedule"] = ProgressiveTrainer(config).curriculum(start, target)
    return StackWiseConfig.from_dict(data)


# ---- by hand: the builder ------------------------------------------------------------------------


class ProgressiveRackBuilder:
    """Owns a model (embedding, rack, head) and grows its rack stack by stack.

    `config` is a StackWiseConfig, dict or YAML path; `vocab_size` defaults to the config's.
    """

    def __init__(self, config: StackWiseConfig | Mapping[str, Any] | str | os.PathLike[str], vocab_size: int | None = None,
                 model: StackWiseModel | None = None):
        self.config = StackWiseConfig.load(config)
        self.model = model or StackWiseModel(self.config.model, vocab_size=vocab_size or self.config.model.vocab_size)

    @property
    def rack(self) -> Any:
        return self.model.rack

    def add_stack(self, where: str = "append", init: str = "random") -> int:
        """Add one stack; returns its rack position."""
        return add_stacks(self.model, 1, where, init)[0]

    def freeze(self, positions: Iterable[int] | None = None, precision: str = "fp32") -> None:
        for position in self._positions(positions):
            freeze(self.rack[position], precision)

    def unfreeze(self, positions: Iterable[int] | None = None) -> None:
        for position in self._positions(positions):
            make_trainable(self.rack[position])

    def attach_lora(self, positions: Iterable[int] | None = None, rank: int = 8, alpha: float = 16.0,
                    precision: str = "nf4", targets: list[str] | None = None) -> None:
        lora = LoraConfig(rank=rank, alpha=alpha, **({"targets": targets} if targets else {}))
        for position in self._positions(positions):
            adapt(self.rack[position], lora, precision)

    def quantize_trunk(self, positions: Iterable[int] | None = None) -> None:
        """Store frozen stacks in NF4 (all frozen stacks by default)."""
        chosen = positions if positions is not None else [i for i, s in enumerate(self.rack) if s.role == "frozen"]
        self.freeze(chosen, precision="nf4")

    def to_spec(self) -> RackSpec:
        return self.rack.to_spec()

    def _positions(self, positions: Iterable[int] | None) -> list[int]:
        return list(range(len(self.rack))) if positions is None else [p % len(self.rack) for p in positions]


# ---- the front door: grow to K stacks on the TrainingMachine ---------------------------------------


class ProgressiveTrainer:
    """Grows a rack to K stacks, one phase per stack, by building a curriculum and running it on
    the TrainingMachine (the same engine as every other run).

    The growth settings come from `training.progressive` (where, init, trunk, trunk precision,
    LoRA); each growth phase trains the new stack (`trainable: new`) over the configured trunk.
    """

    def __init__(self, config: StackWiseConfig | Mapping[str, Any] | str | os.PathLike[str]):
        self.config = StackWiseConfig.load(config)

    def curriculum(self, start_stacks: int, target_stacks: int, train_first: bool = True) -> list[dict[str, Any]]:
        """The phases: (optionally) the starting rack, then one growth phase per new stack."""
        if target_stacks < start_stacks:
            raise ConfigError([("target_stacks", f"is below the rack's {start_stacks} stacks", target_stacks)])
        grow = self.config.training.progressive
        phases = []
        if train_first:
            phases.append({"name": f"stacks{start_stacks}", "model_config": {"trainable": "all"}})
        for n in range(start_stacks + 1, target_stacks + 1):
            phases.append({
                "name": f"stacks{n}",
                "model_config": {
                    "grow": {"n": 1, "where": grow.where, "init": grow.init},
                    "trainable": "new", "trunk": grow.trunk, "trunk_precision": grow.trunk_precision,
                    "lora": grow.lora.model_dump(), "head": grow.head,
                },
            })
        if not phases:
            raise ConfigError([("target_stacks", "the rack already has that many stacks and nothing trains", target_stacks)])
        for i, phase in enumerate(phases):
            phase["start_t"], phase["end_t"] = i / len(phases), (i + 1) / len(phases)
        phases[-1]["end_t"] = 1.0
        return phases

    def train_rack(self, builder: ProgressiveRackBuilder, dataloader: Any = None, target_stacks: int | None = None,
                   total_steps: int | None = None, **machine_kwargs: Any) -> Any:
        from stackwise.training.machine import TrainingMachine

        target = target_stacks or self.config.training.progressive.target_stacks
        if target is None:
            raise ConfigError([("training.progressive.target_stacks", "how many stacks to grow to is not set", None)])
        start = len(builder.rack)
        train_first = any(s.role == "trainable" for s in builder.rack)
        schedule = self.curriculum(start, target, train_first)
        data = self.config.to_dict()
        data["schedule"] = schedule
        data["model"]["architecture"]["n_stacks"] = start
        config = StackWiseConfig.from_dict(data)
        machine = TrainingMachine(config, total_steps=total_steps, model=builder.model, data=dataloader, **machine_kwargs)
        return machine.train()
