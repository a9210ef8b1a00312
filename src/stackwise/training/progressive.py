"""The model plane of a phase: grow the rack, then give every stack its role.

Called by `ModelAdapter.enter_phase` at each phase start (DESIGN.md section 5, step 2):

1. grow: `n` new stacks, appended (next to the head) or prepended (next to the embedding),
   initialised `random`, as a `copy` of the neighbouring stack, or as an `identity` (random with
   the residual-writing projections zeroed, so the model's function is unchanged);
2. roles: the stacks chosen by `trainable` train; the others (the trunk) are frozen or trainable
   as `trunk` says; the embedding and head follow `embedding` / `head`.
"""

from __future__ import annotations

import copy

import torch

from stackwise.config import ConfigError, PhaseModelConfig, StackWiseConfig
from stackwise.model import Stack, StackWiseModel


def apply_model_phase(model: StackWiseModel, plane: PhaseModelConfig, phase_index: int, config: StackWiseConfig) -> None:
    new_positions = grow(model, plane) if plane.grow is not None else []
    chosen = trainable_positions(len(model.rack), plane.trainable, new_positions, phase_index)
    set_roles(model, chosen, plane)


def grow(model: StackWiseModel, plane: PhaseModelConfig) -> list[int]:
    """Add `plane.grow.n` stacks; returns their rack positions after growth."""
    spec = plane.grow
    rack = model.rack
    positions = []
    for _ in range(spec.n):
        neighbour = rack[-1] if spec.where == "append" else rack[0]
        stack = _new_stack(model, neighbour, spec.init)
        position = len(rack) if spec.where == "append" else 0
        rack.insert(position, stack)
        positions = [p + (1 if spec.where == "prepend" else 0) for p in positions] + [position]
    return sorted(positions)


def _new_stack(model: StackWiseModel, neighbour: Stack, init: str) -> Stack:
    device = next(model.parameters()).device
    if init == "copy":
        # The stacking operator of the growth literature: the new stack starts as its neighbour.
        stack = copy.deepcopy(neighbour)
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
    if selector == "all":
        return list(range(n_stacks))
    if selector == "new":
        if not new_positions:
            raise ConfigError([(f"schedule.{phase_index}.model_config.trainable", "is 'new' but the phase grows no stack", selector)])
        return new_positions
    if isinstance(selector, str):  # last:K (validated by the config)
        k = int(selector.split(":")[1])
        if k > n_stacks:
            raise ConfigError([(f"schedule.{phase_index}.model_config.trainable", f"asks for {k} stacks, the rack has {n_stacks}", selector)])
        return list(range(n_stacks - k, n_stacks))
    bad = [i for i in selector if not -n_stacks <= i < n_stacks]
    if bad:
        raise ConfigError([(f"schedule.{phase_index}.model_config.trainable", f"positions {bad} are outside a rack of {n_stacks} stacks", selector)])
    return sorted({i % n_stacks for i in selector})


def set_roles(model: StackWiseModel, chosen: list[int], plane: PhaseModelConfig) -> None:
    for position, stack in enumerate(model.rack):
        if position in chosen or plane.trunk == "trainable":
            stack.unfreeze()
        else:
            stack.freeze()
    bottom_in_trunk = 0 not in chosen and plane.trunk != "trainable"
    embedding_trains = plane.embedding == "trainable" or (plane.embedding == "auto" and not bottom_in_trunk)
    model.head.requires_grad_(plane.head == "trainable")
    # With tied weights the shared matrix follows the embedding: it feeds the trunk, and a
    # trunk whose input moves could not be cached.
    model.embedding.requires_grad_(embedding_trains)
