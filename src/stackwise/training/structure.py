"""The model plane of every phase, replayed on a shapes-only model (meta device) without training.

`stackwise plan` shows the structure of each phase from it, and the TrainingMachine checks at
start that every phase's model plane can be applied (`trainable: last:99` on a 2-stack rack,
`trainable: [7]`, `trainable: new` without growth, an `every` that falls inside a stack, ...)
before anything is created, instead of failing when that phase starts, after the earlier
phases have trained. The rack structure after each phase is also what a checkpoint of that phase
must hold. Nothing is allocated: a 70B-shaped rack costs nothing.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from stackwise.config import ConfigError, StackWiseConfig
from stackwise.data.tokenizer import SPECIAL_TOKENS
from stackwise.model import StackWiseModel
from stackwise.training.progressive import apply_model_phase, with_growth_schedule
from stackwise.training.schedule import Phase, PhaseSchedule


def planned_vocab(config: StackWiseConfig) -> int:
    """The vocabulary the run will have, known without reading the corpus."""
    if config.model.vocab_size is not None:
        return config.model.vocab_size
    if config.data.use_dummy_data:
        return 512
    if config.data.tokenizer.kind == "bpe":
        return config.data.tokenizer.vocab_size
    return 256 + len(SPECIAL_TOKENS)


def replay_phases(config: StackWiseConfig, total_steps: int) -> Iterator[tuple[int, Phase, StackWiseModel]]:
    """(index, phase, model) after each phase's model plane, on one shapes-only model (the same
    object each time, changed in place). A plane that cannot be applied raises ConfigError
    naming the phase's field."""
    config = with_growth_schedule(config)
    schedule = PhaseSchedule.from_config(config, total_steps)
    with _shapes_only(config):
        model = StackWiseModel(config.model, vocab_size=planned_vocab(config))
    for index, phase in enumerate(schedule.phases):
        with _shapes_only(config):
            apply_model_phase(model, phase.model, index, config)
        yield index, phase, model


def planned_racks(config: StackWiseConfig, total_steps: int) -> list[dict[str, Any]]:
    """The rack structure (`RackSpec.to_dict()`) before the first phase, then after each phase:
    `planned_racks(...)[i + 1]` is what a checkpoint taken in phase i holds."""
    config = with_growth_schedule(config)
    with _shapes_only(config):
        start = StackWiseModel(config.model, vocab_size=planned_vocab(config)).rack.to_spec().to_dict()
    return [start] + [model.rack.to_spec().to_dict() for _, _, model in replay_phases(config, total_steps)]


@contextlib.contextmanager
def _shapes_only(config: StackWiseConfig) -> Iterator[None]:
    """Build on the meta device; shapes whose byte counts overflow 64 bits (even unallocated)
    are a config error, not a traceback."""
    try:
        with torch.device("meta"):
            yield
    except (RuntimeError, OverflowError) as err:
        if "overflow" not in str(err).lower():
            raise
        sizes = {key: getattr(config.model, key) for key in ("d_model", "ffn_hidden", "vocab_size", "max_seq_len")}
        raise ConfigError([("model", f"the shapes' sizes overflow 64-bit byte counts ({err}); reduce "
                                     "d_model, ffn_hidden, vocab_size or max_seq_len", sizes)]) from None
