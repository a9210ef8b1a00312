"""Factories: build each plane from a config, or accept a ready-made object and check it."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from stackwise.config import OptimizerConfig, StackWiseConfig
from stackwise.data import check_vocab
from stackwise.model import StackWiseModel
from stackwise.training import optimizer as optimizer_plane
from stackwise.training.loader import ProgressiveDataLoader

ConfigLike = StackWiseConfig | Mapping[str, Any] | str | os.PathLike[str]


def build_data_loader(source: ConfigLike | ProgressiveDataLoader, run_dir: str | Path | None = None) -> ProgressiveDataLoader:
    """A ProgressiveDataLoader from a config (object, dict or YAML path), or `source` itself."""
    if isinstance(source, ProgressiveDataLoader):
        return source
    return ProgressiveDataLoader(StackWiseConfig.load(source), run_dir=run_dir)


def build_model(source: ConfigLike | StackWiseModel, vocab_size: int | None = None) -> StackWiseModel:
    """A StackWiseModel sized by the config; its vocabulary follows the tokenizer's (`vocab_size`)
    unless the config sets a larger one. A ready-made model is checked and returned."""
    if isinstance(source, StackWiseModel):
        if vocab_size is not None:
            check_vocab(source.vocab_size, vocab_size)
        return source
    cfg = StackWiseConfig.load(source).model
    if cfg.vocab_size is not None and vocab_size is not None:
        check_vocab(cfg.vocab_size, vocab_size)
    return StackWiseModel(cfg, vocab_size=cfg.vocab_size or vocab_size)


def build_optimizer(
    model: torch.nn.Module,
    source: ConfigLike | OptimizerConfig | torch.optim.Optimizer,
    previous: torch.optim.Optimizer | None = None,
) -> torch.optim.Optimizer:
    """An optimizer over exactly the model's trainable parameters (state carried over from
    `previous` by parameter name). A ready-made optimizer is returned as it is."""
    if isinstance(source, torch.optim.Optimizer):
        return source
    cfg = source if isinstance(source, OptimizerConfig) else StackWiseConfig.load(source).training.optimizer
    return optimizer_plane.build_optimizer(model, cfg, previous=previous)
