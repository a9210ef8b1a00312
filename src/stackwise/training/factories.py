"""Factories: build each plane from a config, or accept a ready-made object and check it (or, for
the data plane, your own iterable of token-id batches: training/user_data.py)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from stackwise.config import OptimizerConfig, StackWiseConfig
from stackwise.data import Tokenizer, check_vocab
from stackwise.model import StackWiseModel
from stackwise.specs import BatchSpec
from stackwise.training import optimizer as optimizer_plane
from stackwise.training.adapters import DataAdapter
from stackwise.training.loader import ProgressiveDataLoader
from stackwise.training.user_data import UserData

ConfigLike = StackWiseConfig | Mapping[str, Any] | str | os.PathLike[str]


def build_data_loader(
    source: ConfigLike | ProgressiveDataLoader | UserData | Iterable[Any] | Any,
    batch_spec: BatchSpec | None = None,
    run_dir: str | Path | None = None,
    *,
    val_data: Iterable[Any] | None = None,
    tokenizer: Tokenizer | str | os.PathLike[str] | None = None,
    mask_id: int | None = None,
    on_resume: str = "skip",
) -> ProgressiveDataLoader | UserData:
    """The data plane's loader.

    - A config (object, dict or YAML path): a `ProgressiveDataLoader` over its corpus.
    - A ready `ProgressiveDataLoader` or `UserData` (or a `DataAdapter`: its loader): returned as
      it is (`val_data` is attached to a `UserData` that has none).
    - Any other iterable of token-id batches (a DataLoader, an IterableDataset, a generator...):
      a `UserData` wrapping it (training/user_data.py); `batch_spec` says what its batches hold
      (left out, a TrainingMachine takes it from its config). `val_data`, `tokenizer`, `mask_id`
      and `on_resume` ("skip" or "restart") are its options (docs/data.md, "Your own data")."""
    if isinstance(batch_spec, (str, os.PathLike)) and run_dir is None:  # the older (source, run_dir) call
        batch_spec, run_dir = None, batch_spec
    options = dict(val_data=val_data, tokenizer=tokenizer, mask_id=mask_id)
    if isinstance(source, DataAdapter):
        source = source.loader  # a DataAdapter's loader (the machine builds its own adapter over it)
    if isinstance(source, UserData):
        if batch_spec is not None or tokenizer is not None or mask_id is not None or on_resume != "skip":
            raise TypeError("build_data_loader: a ready UserData takes no batch_spec, tokenizer, mask_id or on_resume")
        if val_data is not None:
            if source.val_data is not None:
                raise TypeError("build_data_loader: the UserData already has val_data")
            source.val_data = val_data
        return source
    user = not isinstance(source, (ProgressiveDataLoader, StackWiseConfig, Mapping, str, os.PathLike))
    if not user and (batch_spec is not None or any(v is not None for v in options.values()) or on_resume != "skip"):
        given = [k for k, v in {"batch_spec": batch_spec, **options}.items() if v is not None]
        raise TypeError(f"build_data_loader: {', '.join(given) or 'on_resume'} go with your own data (an iterable "
                        f"of token-id batches), not with a {type(source).__name__}")
    if user:
        return UserData(source, batch_spec, on_resume=on_resume, **options)
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
