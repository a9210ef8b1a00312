"""Progressive growth: the model plane of a phase, and the front door that grows a rack.

`apply_model_phase` is what `ModelAdapter.enter_phase` runs at each phase start (DESIGN.md
section 5, step 2):

1. grow (docs/training.md, "Growth operators"):
   - `where: append|prepend`: `n` new stacks next to the head or the embedding, initialised
     `random`, as a `copy` of the neighbouring stack, or as an `identity` (random with the
     residual-writing projections zeroed, so the model's function is unchanged);
   - `where: interleave, every: k`: a new stack after every k blocks (LLaMA Pro);
   - `init: upscale, trim: m`: depth up-scaling, the rack followed by a copy of itself with m
     blocks dropped at the seam of each (SOLAR);
   - `init: stack, factor: k`: the whole rack repeated k times (G_stack);
2. roles: the stacks chosen by `trainable` train; the others (the trunk) are `frozen`, adapted
   (`qlora`: LoRA adapters over a frozen base stored in `trunk_precision`, NF4 by default) or
   `trainable`; the embedding and head follow `embedding` / `head`.

Every operator is a deterministic function of the rack's structure: a resumed run replays the
model plane of the phases so far on a fresh model and gets the same stack ids and block counts,
then loads the weights by name. Existing stacks keep their ids (parameter names), new stacks get
ids above every id the rack has had.

`ProgressiveRackBuilder` owns a model and offers the same operations by hand;
`ProgressiveTrainer.train_rack` turns "grow to K stacks" into a curriculum of one phase per stack
and runs it on the one engine, the TrainingMachine.
"""

from __future__ import annotations

import copy
import itertools
import os
import weakref
from collections.abc import Iterable, Mapping
from typing import Any, NamedTuple

import torch

from stackwise.config import (
    ConfigError,
    GrowConfig,
    LoraConfig,
    LrSchedule,
    PhaseModelConfig,
    StackWiseConfig,
)
from stackwise.model import Block, Rack, Stack, StackWiseModel
from stackwise.model.lora import add_adapters, attach_lora, lora_layers, merge_lora, merge_lora_
from stackwise.specs import RackSpec

# ---- the model plane of a phase -----------------------------------------------------------------


class Growth(NamedTuple):
    """What one `grow` setting did: the rack positions of the new stacks, and, for the parameters
    of copied blocks, the name (before growth) of the parameter each copies."""

    positions: list[int]
    sources: dict[str, str]


def apply_model_phase(model: StackWiseModel, plane: PhaseModelConfig, phase_index: int, config: StackWiseConfig) -> Growth:
    """Grow, then set roles; returns what the growth added (no stacks when the phase grows none)."""
    field = f"schedule.{phase_index}.model_config.grow"
    growth = grow_with_sources(model, plane.grow, field) if plane.grow else Growth([], {})
    chosen = trainable_positions(len(model.rack), plane.trainable, growth.positions, phase_index)
    set_roles(model, chosen, plane)
    return growth


def stack_parameter_names(model: StackWiseModel, positions: Iterable[int]) -> set[str]:
    """Names (as `model.named_parameters()` gives them) of the parameters of the stacks at
    `positions`: e.g. what a phase added, for `optimizer.warmup_new`."""
    wanted = {id(p) for position in positions for p in model.rack[position].parameters()}
    return {name for name, p in model.named_parameters() if id(p) in wanted}


def grow_rack(model: StackWiseModel, grow: GrowConfig, field: str = "grow") -> list[int]:
    """Apply one `grow` setting; returns the rack positions of the new stacks (after growth).
    `field` names the setting in errors (`schedule.I.model_config.grow` for a phase's)."""
    return grow_with_sources(model, grow, field).positions


def grow_with_sources(model: StackWiseModel, grow: GrowConfig, field: str = "grow") -> Growth:
    """`grow_rack`, also naming the parameter each parameter of a copied block copies (before
    any role changes them: a source stack may be quantized by the phase's roles next)."""
    names_before = {id(p): name for name, p in model.named_parameters()}
    positions = _apply_operator(model, grow, field)
    return Growth(positions, _copy_sources(model, positions, names_before))


def _copy_sources(model: StackWiseModel, positions: list[int], names_before: Mapping[int, str]) -> dict[str, str]:
    """{name of a parameter of a copied block at `positions`: name before growth of its source};
    the links `_dense_copy` recorded are dropped here. A parameter with no same-named,
    same-shaped source (a copy of a LoRA block is merged and dense) is left out."""
    names_now = {id(p): name for name, p in model.named_parameters()}
    sources: dict[str, str] = {}
    for position in positions:
        for block in model.rack[position].blocks:
            theirs = _COPY_OF.pop(block, {})
            for local, param in block.named_parameters():
                old = theirs.get(local)
                if old is not None and old.shape == param.shape and id(old) in names_before:
                    sources[names_now[id(param)]] = names_before[id(old)]
    return sources


def _apply_operator(model: StackWiseModel, grow: GrowConfig, field: str) -> list[int]:
    if grow.init in ("upscale", "stack"):  # the operator places its copies itself (GrowConfig checks `where`)
        return upscale_rack(model, grow.trim, field) if grow.init == "upscale" else stack_rack(model, grow.factor)
    if grow.where == "interleave":
        return interleave_stacks(model, grow.every, grow.blocks or 1, grow.init, field)
    return add_stacks(model, grow.n, grow.where, grow.init, grow.blocks, field)


def add_stacks(model: StackWiseModel, n: int, where: str = "append", init: str = "random",
               blocks: int | None = None, field: str = "grow") -> list[int]:
    """Add `n` stacks of `blocks` blocks (default: the neighbour's) next to the head (`append`)
    or the embedding (`prepend`); returns their rack positions after growth."""
    rack = model.rack
    positions: list[int] = []
    for _ in range(n):
        neighbour = rack[-1] if where == "append" else rack[0]
        if init == "copy" and blocks not in (None, len(neighbour)):
            raise ConfigError([(f"{field}.blocks", f"init: copy duplicates the neighbouring stack of {len(neighbour)} "
                                "blocks; leave blocks out or set it to that", blocks)])
        stack = _new_stack(model, neighbour, init, blocks or len(neighbour))
        position = len(rack) if where == "append" else 0
        rack.insert(position, stack)
        positions = [p + (1 if where == "prepend" else 0) for p in positions] + [position]
    return sorted(positions)


def interleave_stacks(model: StackWiseModel, every: int, blocks: int = 1, init: str = "identity",
                      field: str = "grow") -> list[int]:
    """LLaMA Pro: a new stack of `blocks` blocks after every `every` blocks of the rack (block
    positions counted from the embedding; the last group may be shorter and gets none). `identity`
    copies the `blocks` blocks just before each insertion point with their output projections
    zeroed, so the logits do not change; `copy` copies them as they are; `random` is fresh.
    Returns the new stacks' positions."""
    rack = model.rack
    sizes = [len(stack) for stack in rack]
    ends = list(itertools.accumulate(sizes))  # blocks below each stack boundary
    points = list(range(every, ends[-1] + 1, every))
    if not points:
        raise ConfigError([(f"{field}.every", f"exceeds the rack's {ends[-1]} blocks: no stack would be inserted", every)])
    inside = [p for p in points if p not in ends]
    if inside:
        raise ConfigError([(f"{field}.every", (
            f"a new stack goes after every {every} blocks, but the points after blocks {inside} fall inside a stack "
            f"(the rack's stacks hold {sizes} blocks); choose every so that each multiple ends a stack, e.g. make "
            "blocks_per_stack divide every"), every)])
    if init != "random" and blocks > every:
        raise ConfigError([(f"{field}.blocks", f"init: {init} copies the blocks just before each insertion point, "
                            f"and a group holds only every={every}", blocks)])
    flat = [block for stack in rack for block in stack.blocks]
    # Every new stack is made from the rack as it was: the copies never copy each other.
    new = [_interleaved_stack(model, flat[p - blocks:p], init, blocks) for p in points]
    positions = []
    for j, (point, stack) in enumerate(zip(points, new, strict=True)):
        position = ends.index(point) + 1 + j  # after the stack ending at `point`, past the j stacks inserted below
        rack.insert(position, stack)
        positions.append(position)
    return positions


def upscale_rack(model: StackWiseModel, trim: int, field: str = "grow") -> list[int]:
    """SOLAR depth up-scaling: a rack of L blocks becomes blocks [0, L-trim) of itself followed by
    blocks [trim, L) of a copy, 2·(L-trim) blocks. The original stacks stay (the last ones lose
    their trailing blocks, or go when none is left); the copy is new stacks (dense fp32) that lose
    their leading blocks. Returns the copy's positions."""
    rack = model.rack
    total = sum(len(stack) for stack in rack)
    if trim >= total:
        raise ConfigError([(f"{field}.trim", f"must be below the rack's {total} blocks (each copy keeps L - trim of them)", trim)])
    originals = list(rack)
    second = _keep_blocks([_copied_stack(model, list(stack.blocks)) for stack in originals], trim, total)
    # The copies go in before any original is removed: new ids are above every id the rack had,
    # so a removed stack's parameter names (and optimizer state) never pass to a new stack.
    positions = _append(rack, second)
    _keep_blocks(originals, 0, total - trim)
    emptied = [stack_id for stack_id, stack in rack.stacks.items() if not len(stack)]
    for stack_id in emptied:
        del rack.stacks[stack_id]
    return [p - len(emptied) for p in positions]


def stack_rack(model: StackWiseModel, factor: int) -> list[int]:
    """G_stack: the whole rack repeated `factor` times in order, [s0, s1] → [s0, s1, s0', s1'];
    the copies are new stacks (dense fp32). Returns their positions."""
    originals = list(model.rack)
    return _append(model.rack, [_copied_stack(model, list(stack.blocks)) for _ in range(factor - 1) for stack in originals])


def _new_stack(model: StackWiseModel, neighbour: Stack, init: str, n_blocks: int) -> Stack:
    """A stack next to `neighbour` (append/prepend growth)."""
    if init == "copy":
        # The stacking operator of the growth literature: the new stack starts as its neighbour.
        return _copied_stack(model, list(neighbour.blocks))
    stack = _fresh_stack(model, n_blocks)
    return _zero_outputs(stack) if init == "identity" else stack


def _interleaved_stack(model: StackWiseModel, before: list[Block], init: str, n_blocks: int) -> Stack:
    """A stack inserted after the blocks `before` (interleaved growth)."""
    if init == "random":
        return _fresh_stack(model, n_blocks)
    stack = _copied_stack(model, before)
    # LLaMA Pro's identity: a copy of the block below that adds nothing to the residual stream
    # yet, so it starts from features that fit its place rather than from noise.
    return _zero_outputs(stack) if init == "identity" else stack


def _fresh_stack(model: StackWiseModel, n_blocks: int) -> Stack:
    return Stack(model.cfg, n_blocks=n_blocks).to(model.embedding.tokens.weight.device)


def _copied_stack(model: StackWiseModel, blocks: list[Block]) -> Stack:
    """A new trainable fp32 stack of dense copies of `blocks`."""
    stack = Stack(model.cfg, n_blocks=0)
    stack.blocks.extend(_dense_copy(block) for block in blocks)
    return stack


# A copied block → {its parameters' names in the block: the source block's parameters}, from the
# copy until `grow_with_sources` reads it at the end of the same operator (for
# `grow.optimizer_state: copy`). The source's parameters themselves, not the block: an operator
# may delete a source block after copying it (upscale's trim). Keyed weakly, and no attribute of
# the model, so nothing of it is saved, copied or moved with a module.
_COPY_OF: weakref.WeakKeyDictionary[Block, dict[str, torch.nn.Parameter]] = weakref.WeakKeyDictionary()


def _dense_copy(block: Block) -> Block:
    """A trainable fp32 copy of a block however it is stored: adapters and NF4 bases are merged
    into dense weights (a new stack trains in full, not through frozen 4-bit bases)."""
    new = merge_lora(block) if lora_layers(block) else copy.deepcopy(block)
    for module in new.modules():
        module._compiled_call_impl = None  # a compiled forward would still call the original
    new = new.to(torch.float32).requires_grad_(True)
    # a copy of a copy made by the same operator (init: copy with n >= 2) copies the original
    _COPY_OF[new] = _COPY_OF.get(block) or dict(block.named_parameters())
    return new


def _zero_outputs(stack: Stack) -> Stack:
    """Zero what each block writes into the residual stream: the stack computes the identity."""
    with torch.no_grad():
        for block in stack.blocks:
            for proj in block.output_projections():
                proj.weight.zero_()
                if proj.bias is not None:
                    proj.bias.zero_()
    return stack


def _keep_blocks(stacks: list[Stack], start: int, end: int) -> list[Stack]:
    """Keep only the blocks whose index in the concatenation of `stacks` is in [start, end)
    (deleted in place from each stack's ModuleList); returns the stacks left with any block."""
    offset = 0
    for stack in stacks:
        size = len(stack)
        for i in reversed(range(size)):  # from the back, so the indices still to visit stay put
            if not start <= offset + i < end:
                del stack.blocks[i]
        offset += size
    return [stack for stack in stacks if len(stack)]


def _append(rack: Rack, stacks: list[Stack]) -> list[int]:
    """Put `stacks` after the rack's last stack; returns their positions."""
    positions = []
    for stack in stacks:
        positions.append(len(rack))
        rack.insert(len(rack), stack)
    return positions


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
    # auto: an embedding under a frozen/qlora trunk freezes with it (so the trunk's input stays
    # put and its activations can be cached), unless it is also the head's matrix (tied) and the
    # head trains: a tied head frozen with the trunk cost the growth study 0.17 bits/byte
    # (benchmarks/RESULTS.md, "Growth study"), more than the trunk's backward it saves.
    tied_head_trains = model.tied and plane.head == "trainable"
    embedding_trains = plane.embedding == "trainable" or (
        plane.embedding == "auto" and (not bottom_in_trunk or tied_head_trains))
    model.head.requires_grad_(plane.head == "trainable")
    # With tied weights the shared matrix follows the embedding (set last).
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
    return StackWiseConfig.from_dict(run_wide_lr(data, config))


def run_wide_lr(data: dict[str, Any], config: StackWiseConfig) -> dict[str, Any]:
    """`data` (a config as a dict, its phases spelled out from `training.progressive`) with the lr
    shape over the whole run, unless the config says `over` itself: the user wrote no phases for
    the shape to restart in, and one shape over the run beat per-phase shapes at equal FLOPs in
    the growth study (benchmarks/RESULTS.md, "Growth study")."""
    lr = config.training.optimizer.lr
    if isinstance(lr, LrSchedule) and "over" not in lr.model_fields_set:
        data["training"]["optimizer"]["lr"]["over"] = "run"
    return data


# ---- by hand: the builder ------------------------------------------------------------------------


class ProgressiveRackBuilder:
    """Owns a model (embedding, rack, head) and grows its rack stack by stack.

    `config` is a StackWiseConfig, dict or YAML path; `vocab_size` defaults to the config's
    `model.vocab_size`, else to the vocabulary its tokenizer settings give (`planned_vocab`: 512 for
    dummy data, `data.tokenizer.vocab_size` for BPE, 256 bytes + specials for the byte tokenizer).
    """

    def __init__(self, config: StackWiseConfig | Mapping[str, Any] | str | os.PathLike[str], vocab_size: int | None = None,
                 model: StackWiseModel | None = None):
        from stackwise.training.structure import planned_vocab  # structure imports this module

        self.config = StackWiseConfig.load(config)
        vocab_size = vocab_size or self.config.model.vocab_size or planned_vocab(self.config)
        self.model = model or StackWiseModel(self.config.model, vocab_size=vocab_size)

    @property
    def rack(self) -> Any:
        return self.model.rack

    def add_stack(self, where: str = "append", init: str = "random", blocks: int | None = None) -> int:
        """Add one stack (of `blocks` blocks, default the neighbour's); returns its rack position."""
        return self.grow(where=where, init=init, blocks=blocks)[0]

    def interleave(self, every: int, blocks: int = 1, init: str = "identity") -> list[int]:
        """A new stack of `blocks` blocks after every `every` blocks (LLaMA Pro); returns the new
        stacks' positions."""
        return self.grow(where="interleave", every=every, blocks=blocks, init=init)

    def upscale(self, trim: int) -> list[int]:
        """Depth up-scaling (SOLAR): the rack then a copy of it, `trim` blocks dropped at the seam
        of each; returns the copy's positions."""
        return self.grow(init="upscale", trim=trim)

    def stack(self, factor: int) -> list[int]:
        """The whole rack repeated `factor` times (G_stack); returns the copies' positions."""
        return self.grow(init="stack", factor=factor)

    def grow(self, **settings: Any) -> list[int]:
        """Grow as a phase's `grow: {...}` setting would (same validation, same operators)."""
        grow = GrowConfig(**settings)
        if grow.optimizer_state != "fresh":
            raise ConfigError([("grow.optimizer_state", "is a phase's setting: the builder has no optimizer "
                                "(set it in a schedule phase's grow)", grow.optimizer_state)])
        return grow_rack(self.model, grow)

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
        data = run_wide_lr(self.config.to_dict(), self.config)
        data["schedule"] = schedule
        data["model"]["architecture"]["n_stacks"] = start
        config = StackWiseConfig.from_dict(data)
        machine = TrainingMachine(config, total_steps=total_steps, model=builder.model, data=dataloader, **machine_kwargs)
        return machine.train()
