"""Your own data: any iterable of token-id batches as the data plane of a run (docs/data.md,
"Your own data").

`UserData(data, batch_spec)` wraps a `torch.utils.data.DataLoader`, an `IterableDataset`, a
generator, a list... yielding per step one batch: a token-id tensor (B, T+1) or (B, T), a
one-element list or tuple holding one (what a DataLoader over a `TensorDataset` yields), or a dict
with `input_ids` and optional `labels` and `attention_mask`. It turns each into a `Batch` with the
same objective code the built-in loader uses (data/objectives.py): a phase's clm, mlm or
diffusion applies to these batches as to built-in ones.

Semantics (T = seq_len, W = the width of the batch, T or T+1; L = `labels`, default the ids):
- clm: inputs are the first T ids; the target of position t is L[t+1], so a (B, T+1) tensor is
  exactly a built-in window and in a (B, T) one the last position has no target (HF's shift).
- mlm / diffusion: the first T ids are corrupted; the target of position t is L[t] (no shift).
- A position is scored only where its target label is not -100 and `attention_mask` is 1 there;
  mlm and diffusion never mask an unscored position. The model attends to every position.
- The stream is read one batch per step, in order; when it ends, `iter(data)` starts another
  pass (an epoch; a DataLoader's sampler with `set_epoch`, e.g. a DistributedSampler, is told
  the pass first). Every read runs under the stream's own torch RNG (seeded by training.seed and
  the rank, saved in checkpoints), so a loader that shuffles with torch's global generator is a
  pure function of the seed, and draws nothing from the training's random stream.
- Resume: a loader with `state_dict`/`load_state_dict` (torchdata's StatefulDataLoader, HF
  datasets' IterableDataset, your own class) has its state saved in each checkpoint and restored;
  any other is skipped forward over the batches already read (`on_resume="skip"`, the default:
  the exact run again when the loader is deterministic) or restarted (`on_resume="restart"`).
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from stackwise.config import PhaseDataConfig, StackWiseConfig, value_at
from stackwise.data.batch import Batch
from stackwise.data.errors import DataError
from stackwise.data.objectives import ATTENTION_MODE, clm, diffusion, mlm, stable_seed
from stackwise.data.tokenizer import Tokenizer, load_tokenizer
from stackwise.specs import BatchSpec
from stackwise.training.distributed import launched_world_size
from stackwise.training.loader import VALIDATION_SEED, DataSettings
from stackwise.training.schedule import data_settings

IGNORE_INDEX = -100  # a label that is not scored, as in HF transformers
RESUME_MODES = ("skip", "restart")
STATE_VERSION = 1
_INTEGER_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
_FIELDS = ("input_ids", "labels", "attention_mask")


class UserData:
    """A user's iterable of token-id batches, with the `ProgressiveDataLoader` interface the
    `DataAdapter` drives (configure, batch_at, validation_batches, get_batch_spec).

    `batch_spec` says what one batch of `data` holds: `batch_size` rows (under torchrun, one
    rank's rows), `seq_len` T, `vocab_size` (ids must lie below it), the objective. Left out, it
    is taken from the run's config when a `TrainingMachine` binds the data (`training.batch_size`
    / ranks, `training.seq_len`, `model.vocab_size`, which is then required).
    `val_data`: an iterable of validation batches in the same forms (any number of rows); none
    means no evaluation. `tokenizer` (a stackwise `Tokenizer` or the path of a tokenizer.json;
    default `data.tokenizer.path` of the config) gives bits per byte and the [MASK] id;
    `mask_id` sets the [MASK] id without one (needed by mlm and diffusion phases).
    """

    def __init__(
        self,
        data: Iterable[Any],
        batch_spec: BatchSpec | None = None,
        *,
        val_data: Iterable[Any] | None = None,
        tokenizer: Tokenizer | str | os.PathLike[str] | None = None,
        mask_id: int | None = None,
        on_resume: str = "skip",
    ):
        _check_iterable(data, "data")
        if val_data is not None:
            _check_iterable(val_data, "val_data")
        if batch_spec is not None and not isinstance(batch_spec, BatchSpec):
            raise TypeError(f"batch_spec must be a stackwise BatchSpec, got {type(batch_spec).__name__}")
        if on_resume not in RESUME_MODES:
            raise ValueError(f"on_resume must be one of {RESUME_MODES}, got {on_resume!r}")
        if mask_id is not None and (not isinstance(mask_id, int) or isinstance(mask_id, bool) or mask_id < 0):
            raise ValueError(f"mask_id must be a token id (an int >= 0), got {mask_id!r}")
        self.data = data
        self.val_data = val_data
        self.on_resume = on_resume
        self._given_spec = batch_spec
        self._tokenizer_source = tokenizer
        self._mask_id = mask_id
        self.bound = False
        self.config: StackWiseConfig | None = None
        self.rank, self.world_size, self.seed = 0, 1, 0
        self._val_cache: list[Any] | None = None
        self._restored_note: dict[str, Any] | None = None
        if batch_spec is not None:
            self.bind(None)

    # ---- binding to a run -------------------------------------------------------------------

    def bind(self, config: StackWiseConfig | None, rank: int = 0, world_size: int = 1) -> UserData:
        """Fix the stream's spec, tokenizer and seed for a run (the DataAdapter calls this), and
        check every phase of `config` against the stream: a phase that asks for another seq_len or
        batch size, another corpus, or masking without a [MASK] id fails here, before any step."""
        self.config, self.rank, self.world_size = config, rank, world_size
        self.seed = config.training.seed if config is not None else 0
        spec = self._given_spec or _spec_from_config(config, world_size)
        spec.validate()
        self.spec = spec
        self.tokenizer = self._resolve_tokenizer(config)
        if self.tokenizer is not None:
            if self.tokenizer.vocab_size > spec.vocab_size:
                raise DataError(f"the tokenizer has {self.tokenizer.vocab_size} ids, more than your data's vocabulary of "
                                f"{spec.vocab_size} (BatchSpec.vocab_size, or model.vocab_size): raise it to at least "
                                f"{self.tokenizer.vocab_size}")
            lengths = np.zeros(spec.vocab_size, dtype=np.int64)
            lengths[: self.tokenizer.vocab_size] = self.tokenizer.token_byte_lengths
            self._byte_lengths: torch.Tensor | None = torch.from_numpy(lengths)
        else:
            self._byte_lengths = None
        self.mask_id = self._mask_id if self._mask_id is not None else getattr(self.tokenizer, "mask_id", None)
        if self.mask_id is not None and self.mask_id >= spec.vocab_size:
            raise DataError(f"mask_id {self.mask_id} is outside the vocabulary of {spec.vocab_size} ids")
        regular = self.tokenizer.regular_ids if self.tokenizer is not None else np.arange(spec.vocab_size)
        self._regular_ids = torch.from_numpy(np.asarray(regular, dtype=np.int64))
        if self.mask_id is not None:
            self._regular_ids = self._regular_ids[self._regular_ids != self.mask_id]
        if config is not None:
            model_vocab = config.model.vocab_size
            if model_vocab is not None and model_vocab < spec.vocab_size:
                raise DataError(f"model.vocab_size={model_vocab} is smaller than your data's vocabulary "
                                f"(BatchSpec.vocab_size={spec.vocab_size}); set model.vocab_size to at least "
                                f"{spec.vocab_size}")
            self._check_schedule(config)
        self._reset_stream()
        self.bound = True
        self.configure(objective=config.data.objective if config is not None else None)
        return self

    def _resolve_tokenizer(self, config: StackWiseConfig | None) -> Tokenizer | None:
        source = self._tokenizer_source
        if source is None and config is not None:
            source = config.data.tokenizer.path
        if source is None or isinstance(source, Tokenizer):
            return source
        return load_tokenizer(source)

    def _check_schedule(self, config: StackWiseConfig) -> None:
        phases = [(None, "the run", None, None)] if not config.schedule else \
            [(i, p.name, p.data_config, p.task) for i, p in enumerate(config.schedule)]
        for index, name, over, task in phases:
            over = over or PhaseDataConfig()
            settings = data_settings(config, over, task, tau=None)
            where = "the run" if index is None else f"phase {name!r}"
            if over.paths is not None or over.text_field is not None:
                raise DataError(f"{where} names a corpus (schedule[{index}].data_config.paths/text_field), but the run "
                                "trains on your own data (data=...): one stream feeds every phase; drop those keys")
            self._check_shape(settings["seq_len"], settings["batch_size"], where,
                              _key(index, over, "seq_len", "training.seq_len"),
                              _key(index, over, "batch_size", "training.batch_size"))
            if settings["objective"] != "clm" and self.mask_id is None:
                raise DataError(f"{where} uses objective {settings['objective']!r}, which replaces tokens by [MASK], "
                                "but your data's [MASK] id is unknown: set data.tokenizer.path (a tokenizer.json "
                                "with a [MASK] token), or pass tokenizer= or mask_id= to build_data_loader")

    def _check_shape(self, seq_len: int, batch_size: int, where: str, seq_key: str, batch_key: str) -> None:
        spec = self.spec
        if seq_len != spec.seq_len:
            raise DataError(f"{where} asks for seq_len {seq_len} ({seq_key}), but your data's batches hold "
                            f"{spec.seq_len} positions (BatchSpec.seq_len): your iterable decides the shapes, so "
                            f"set {seq_key}: {spec.seq_len}")
        if batch_size != spec.batch_size * self.world_size:
            ranks = f" over {self.world_size} ranks" if self.world_size > 1 else ""
            raise DataError(f"{where} asks for batch_size {batch_size} ({batch_key}), but your data yields "
                            f"{spec.batch_size} rows a batch{ranks} (BatchSpec.batch_size): your iterable decides "
                            f"the shapes, so set {batch_key}: {spec.batch_size * self.world_size}")

    def _need_bound(self) -> None:
        if not self.bound:
            raise DataError("your data has no BatchSpec yet: give one (build_data_loader(data, BatchSpec(...))), or "
                            "hand the data to a TrainingMachine, which takes it from the config")

    # ---- settings ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        self._need_bound()
        return self.spec.vocab_size

    @property
    def settings(self) -> DataSettings:
        return self._settings

    @property
    def knows_bytes(self) -> bool:
        """Whether bits per byte can be reported (a tokenizer is known)."""
        return self._byte_lengths is not None

    @property
    def has_validation(self) -> bool:
        return self.val_data is not None

    n_train_windows = 0  # no fixed set of samples: nothing to size an activation cache by

    @property
    def n_train_tokens(self) -> int | None:
        """Tokens of one pass over the data, for time in epochs: `len(data)` batches (a sized
        loader: a DataLoader over a map-style dataset) of batch_size rows on every rank, counted
        as windows of seq_len + 1 (one epoch = that many windows, as for a corpus). None when
        the data has no length or no BatchSpec yet."""
        try:
            batches = len(self.data)  # type: ignore[arg-type]
        except TypeError:
            return None
        if not self.bound:
            return None
        ranks = self.world_size if self.config is not None else launched_world_size()
        return batches * self.spec.batch_size * ranks * (self.spec.seq_len + 1)

    cache_off_reason = "your own data (data=...) has no fixed sample identities to key cached activations by"

    def configure(
        self,
        *,
        phase_index: int = 0,
        seq_len: int | None = None,
        batch_size: int | None = None,
        objective: str | None = None,
        mask_rate: Any = None,
        mask_range: tuple[float, float] | None = None,
        paths: Any = None,
        text_field: str | None = None,
        **corpus_settings: Any,
    ) -> DataSettings:
        """A phase's settings. Only the objective and its masking change the stream; seq_len and
        batch_size must be the stream's own (checked for the whole schedule at bind). Settings of
        a corpus (paths, text_field, ...) do not apply to your own data and are ignored here."""
        self._need_bound()
        spec, config = self.spec, self.config
        objective = objective or spec.objective
        if objective not in ATTENTION_MODE:
            raise ValueError(f"unknown objective {objective!r}; expected one of {', '.join(ATTENTION_MODE)}")
        seq_len = seq_len if seq_len is not None else spec.seq_len
        batch_size = batch_size if batch_size is not None else spec.batch_size * self.world_size
        self._check_shape(seq_len, batch_size, f"phase {phase_index}", "seq_len", "batch_size")
        if objective != "clm" and self.mask_id is None:
            raise DataError(f"objective {objective!r} needs a [MASK] id: pass tokenizer= or mask_id=")
        if mask_rate is None:
            mask_rate = config.data.mask_rate if config is not None else (spec.mask_rate or 0.15)
        if mask_range is None:
            mask_range = tuple(config.data.mask_range) if config is not None else (0.02, 1.0)
        self._settings = DataSettings(phase_index=phase_index, seq_len=seq_len, batch_size=batch_size,
                                      objective=objective, mask_rate=mask_rate, mask_range=tuple(mask_range),
                                      paths=(), text_field="")
        return self._settings

    def get_batch_spec(self, tau: float = 0.0) -> BatchSpec:
        """What one batch of the stream holds in the current phase (rows: one rank's)."""
        self._need_bound()
        s = self._settings
        return BatchSpec(batch_size=self.spec.batch_size, seq_len=s.seq_len, vocab_size=self.spec.vocab_size,
                         objective=s.objective, attention_mode=ATTENTION_MODE[s.objective],
                         mask_rate=value_at(s.mask_rate, tau) if s.objective == "mlm" else None)

    # ---- the training stream ----------------------------------------------------------------

    def _reset_stream(self) -> None:
        """Back to the start of the data: before any batch was read."""
        self.position = 0  # batches read from `data` so far, over all passes
        self.epoch = 0
        self.epoch_batches = 0  # batches read in the current pass
        self._iterator: Iterator[Any] | None = None
        self._rng = _seeded_state("user data", self.seed, self.rank)
        self._pending_skip = 0

    def _isolated(self, work: Any) -> Any:
        """`work()` under the stream's own torch RNG state: what the user's loader draws from
        torch's global generator (a shuffling sampler, workers' base seed) comes from it."""
        saved = torch.get_rng_state()
        torch.set_rng_state(self._rng)
        try:
            return work()
        finally:
            self._rng = torch.get_rng_state()
            torch.set_rng_state(saved)

    def _next_raw(self) -> Any:
        """The next batch of `data`, starting a new pass when one ends."""
        for attempt in range(2):
            if self._iterator is None:
                _set_epoch(self.data, self.epoch)
                self._iterator = self._isolated(lambda: iter(self.data))
            try:
                raw = self._isolated(lambda: next(self._iterator))
            except StopIteration:
                self._iterator = None
                if self.position == 0:
                    raise DataError("your data (data=...) yielded no batch: the iterable is empty") from None
                if attempt == 1 or self.epoch_batches == 0:
                    raise DataError(
                        f"your data ran out after {self.position} batches: a generator (or any one-shot "
                        "iterator) can be read once. Pass something that can be iterated again (a DataLoader, "
                        "a Dataset, a list, or an object whose __iter__ makes a new generator), or one long "
                        "enough for the run's steps") from None
                self.epoch += 1
                self.epoch_batches = 0
                continue
            self.position += 1
            self.epoch_batches += 1
            return raw
        raise AssertionError("unreachable")

    def batch_at(self, step: int, tau: float = 0.0, phase_start_step: int = 0, *, rank: int = 0,
                 world_size: int = 1) -> Batch:
        """The next batch of the stream (the stream is read in order, one batch a step, so `step`
        is not used to find it), corrupted by the current phase's objective at local time τ."""
        self._need_bound()
        while self._pending_skip:  # a resume that skips forward over the batches already read
            self._pending_skip -= 1
            self._next_raw()
        index = self.position
        raw = self._next_raw()
        s = self._settings
        first = (index * self.world_size + self.rank) * self.spec.batch_size
        return self._make_batch(raw, f"batch {index} of your data", value_at(s.mask_rate, tau), self.seed,
                                s.phase_index, first, rows=self.spec.batch_size)

    def __iter__(self) -> Iterator[Batch]:
        step = 0
        while True:
            yield self.batch_at(step)
            step += 1

    def validation_batches(self, max_batches: int | None = None, *, tau: float = 0.0) -> Iterator[Batch]:
        """The validation batches (`val_data`, at most `max_batches`), corrupted with a fixed seed
        independent of training.seed and the phase, as the built-in validation is. A one-shot
        iterator is read once; its batches are kept for every later evaluation."""
        self._need_bound()
        if self.val_data is None:
            return
        raws = self._validation_raws(max_batches)
        rate = value_at(self._settings.mask_rate, tau)
        first = 0
        for i, raw in enumerate(raws):
            batch = self._make_batch(raw, f"validation batch {i} of val_data", rate, VALIDATION_SEED, "validation",
                                     first, rows=None)
            first += batch.batch_size
            yield batch

    def _validation_raws(self, max_batches: int | None) -> list[Any]:
        if self._val_cache is not None:
            return self._val_cache[:max_batches]
        one_shot = isinstance(self.val_data, Iterator)  # a generator: it can be read once
        state = [_seeded_state("user validation", self.rank)]  # every evaluation reads the same batches

        def isolated(work: Any) -> Any:
            saved = torch.get_rng_state()
            torch.set_rng_state(state[0])
            try:
                return work()
            finally:
                state[0] = torch.get_rng_state()
                torch.set_rng_state(saved)

        iterator = isolated(lambda: iter(self.val_data))
        raws: list[Any] = []
        while max_batches is None or len(raws) < max_batches:
            try:
                raws.append(isolated(lambda: next(iterator)))
            except StopIteration:
                break
        if not raws:
            raise DataError("val_data yielded no batch: give validation batches, or leave val_data out "
                            "(evaluation is then skipped)")
        if one_shot:
            self._val_cache = raws
        return raws

    # ---- one batch ----------------------------------------------------------------------------

    def _make_batch(self, raw: Any, where: str, rate: float, seed: int, phase: int | str, first: int,
                    rows: int | None) -> Batch:
        ids, labels, keep = self._fields(raw, where, rows)
        s, T = self._settings, self._settings.seq_len
        targets_given = labels if labels is not None else ids
        scored = targets_given != IGNORE_INDEX
        if keep is not None:
            scored &= keep
        B = ids.shape[0]
        sample_ids = torch.arange(first, first + B, dtype=torch.int64)
        if s.objective == "clm":
            if labels is None and keep is None and ids.shape[1] == T + 1:
                c = clm(ids)  # a plain window: exactly what the built-in loader makes
                return self._batch(c.input_ids, c.labels, c.loss_mask, c.loss_weight, None, sample_ids,
                                   c.labels.numel(), c.labels, partial=False)
            shifted, where_scored = targets_given[:, 1:T + 1], scored[:, 1:T + 1]
            if shifted.shape[1] < T:  # (B, T): the last position has no next token
                pad = torch.zeros((B, T - shifted.shape[1]), dtype=torch.int64)
                shifted = torch.cat([shifted, pad], dim=1)
                where_scored = torch.cat([where_scored, pad.bool()], dim=1)
            n = int(where_scored.sum())
            if n == 0:
                raise DataError(f"{where}: no position is scored (every target label is -100, or masked out by "
                                "attention_mask)")
            target = torch.where(where_scored, shifted, torch.zeros_like(shifted))
            return self._batch(ids[:, :T].contiguous(), target, where_scored, where_scored.float(), None,
                               sample_ids, n, target[where_scored], partial=not bool(where_scored.all()))
        tokens, eligible = ids[:, :T].contiguous(), scored[:, :T].contiguous()
        target = torch.where(eligible, targets_given[:, :T], torch.zeros_like(tokens))
        if not bool(eligible.any()):
            raise DataError(f"{where}: no position can be scored (every label is -100, or masked out by "
                            "attention_mask)")
        if s.objective == "mlm":
            c = mlm(tokens, sample_ids.tolist(), rate=rate, mask_id=self.mask_id, regular_ids=self._regular_ids,
                    seed=seed, phase=phase, eligible=eligible)
            n, counted = int(c.loss_mask.sum()), target[c.loss_mask]
        else:
            c = diffusion(tokens, sample_ids.tolist(), mask_range=s.mask_range, mask_id=self.mask_id, seed=seed,
                          phase=phase, eligible=eligible)
            # Diffusion's weighted loss bounds the NLL of every scored token (as built-in: B·T).
            n, counted = int(eligible.sum()), target[eligible]
        return self._batch(c.input_ids, target, c.loss_mask, c.loss_weight, c.mask_rates, sample_ids, n, counted,
                           partial=True)

    def _batch(self, inputs: torch.Tensor, labels: torch.Tensor, loss_mask: torch.Tensor, weight: torch.Tensor,
               rates: torch.Tensor | None, sample_ids: torch.Tensor, n_targets: int, counted: torch.Tensor,
               partial: bool) -> Batch:
        s = self._settings
        n_bytes = int(self._byte_lengths[counted].sum()) if self._byte_lengths is not None else 0
        return Batch(input_ids=inputs, labels=labels, loss_mask=loss_mask, loss_weight=weight, sample_ids=sample_ids,
                     attention_mode=ATTENTION_MODE[s.objective], objective=s.objective, n_target_tokens=n_targets,
                     n_target_bytes=n_bytes, mask_rates=rates, partial_loss=partial and s.objective == "clm")

    def _fields(self, raw: Any, where: str, rows: int | None) -> tuple[torch.Tensor, torch.Tensor | None,
                                                                        torch.Tensor | None]:
        """(ids, labels or None, attention mask as bool or None) of one raw batch, checked."""
        if isinstance(raw, Mapping):
            if "input_ids" not in raw:
                keys = ", ".join(repr(k) for k in list(raw)[:10]) or "none"
                raise DataError(f"{where}: a dict without 'input_ids' (its keys: {keys}); a dict batch needs "
                                "input_ids, and may have labels and attention_mask")
            fields = {k: raw.get(k) for k in _FIELDS}
        elif isinstance(raw, (list, tuple)) and len(raw) == 1:
            fields = {"input_ids": raw[0], "labels": None, "attention_mask": None}  # a one-tensor TensorDataset
        elif isinstance(raw, (torch.Tensor, np.ndarray)):
            fields = {"input_ids": raw, "labels": None, "attention_mask": None}
        else:
            kind = f"a {type(raw).__name__} of {len(raw)}" if isinstance(raw, (list, tuple)) else type(raw).__name__
            raise DataError(f"{where}: got {kind}; a batch is a tensor of token ids (B, T+1) or (B, T), a one-element "
                            "list/tuple holding one, or a dict with 'input_ids' (and optional 'labels', "
                            "'attention_mask')")
        ids = self._ids(fields["input_ids"], "input_ids", where, rows)
        labels = fields["labels"]
        if labels is not None:
            labels = self._ids(labels, "labels", where, rows, like=ids, ignore=True)
        mask = fields["attention_mask"]
        if mask is not None:
            mask = _tensor(mask, "attention_mask", where)
            if mask.shape != ids.shape:
                raise DataError(f"{where}: attention_mask has shape {tuple(mask.shape)}, input_ids {tuple(ids.shape)}; "
                                "they must match")
            if mask.dtype != torch.bool:
                if mask.is_floating_point() or mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
                    raise DataError(f"{where}: attention_mask must hold 0 and 1 (or booleans)")
                mask = mask != 0
        return ids, labels, mask

    def _ids(self, value: Any, name: str, where: str, rows: int | None, like: torch.Tensor | None = None,
             ignore: bool = False) -> torch.Tensor:
        t = _tensor(value, name, where)
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex() or \
                (t.dtype not in _INTEGER_DTYPES and not str(t.dtype).startswith("torch.uint")):
            raise DataError(f"{where}: {name} is a {t.dtype} tensor; token ids must be integers (int64, int32, ...)")
        if like is not None:
            if t.shape != like.shape:
                raise DataError(f"{where}: {name} has shape {tuple(t.shape)}, input_ids {tuple(like.shape)}; "
                                "they must match")
        elif t.ndim != 2:
            hint = (": add the batch dimension (a DataLoader with batch_size=..., or a tensor of shape (B, T+1))"
                    if t.ndim == 1 else "")
            raise DataError(f"{where}: {name} has shape {tuple(t.shape)}, a {t.ndim}-D tensor; expected "
                            f"(batch, seq_len + 1) or (batch, seq_len){hint}")
        else:
            T = self._settings.seq_len
            if t.numel() == 0:
                raise DataError(f"{where}: {name} is empty (shape {tuple(t.shape)})")
            if t.shape[1] not in (T, T + 1):
                raise DataError(f"{where}: {name} has shape {tuple(t.shape)}: rows of {t.shape[1]} ids, but the run "
                                f"trains on seq_len {T}, so a row holds {T + 1} ids (a window: inputs and the next "
                                f"token) or {T}")
            if rows is not None and t.shape[0] != rows:
                hint = " (a DataLoader's last batch is short unless drop_last=True)" if t.shape[0] < rows else ""
                raise DataError(f"{where}: {name} has {t.shape[0]} rows, but every training batch has {rows} "
                                f"(BatchSpec.batch_size){hint}")
        t = t.to("cpu", torch.int64)
        values = t[t != IGNORE_INDEX] if ignore else t
        if values.numel():
            low, high = int(values.min()), int(values.max())
            if low < 0 or high >= self.spec.vocab_size:
                bad = low if low < 0 else high
                row, col = (t == bad).nonzero()[0].tolist()
                why = "negative" if bad < 0 else f"outside the vocabulary of {self.spec.vocab_size} ids (model.vocab_size)"
                extra = f" (labels may be -{-IGNORE_INDEX}: not scored)" if ignore else ""
                raise DataError(f"{where}: {name} holds token id {bad} at row {row}, position {col}: {why}{extra}")
        return t

    # ---- checkpoints --------------------------------------------------------------------------

    @property
    def stateful(self) -> bool:
        return callable(getattr(self.data, "state_dict", None)) and callable(getattr(self.data, "load_state_dict", None))

    def state_dict(self) -> dict[str, Any]:
        """Where the stream stands (for a checkpoint): batches read, pass, the stream's RNG, and
        the loader's own `state_dict()` when it has one."""
        state: dict[str, Any] = {"kind": "user", "version": STATE_VERSION, "position": self.position,
                                 "epoch": self.epoch, "epoch_batches": self.epoch_batches, "rng": self._rng.clone()}
        if self.stateful and not self._pending_skip:
            loader_state = self.data.state_dict()
            _check_storable(loader_state, "state_dict()")
            state["loader"] = loader_state
        if self._pending_skip:  # saved again before the skip ran: the position is the same
            state["position"] = self.position + self._pending_skip
        return state

    def load_state_dict(self, state: Mapping[str, Any] | None) -> dict[str, Any]:
        """Put the stream where a checkpoint left it. Returns what was done, for the resume to
        say: {"resume": "restored" | "skip" | "restart", "batches": N, "message": ...}."""
        self._need_bound()
        if state is not None and not isinstance(state, Mapping):
            raise TypeError(f"data: expected a mapping of stream state, got {type(state).__name__}")
        self._reset_stream()
        if not state or state.get("kind") != "user":
            note = {"resume": "restart", "batches": 0,
                    "message": "data: the checkpoint holds no position in your data; the stream restarts from its "
                               "first batch"}
            self._restored_note = note
            return note
        position = state["position"]
        if not isinstance(position, int) or isinstance(position, bool) or position < 0:
            raise ValueError(f"data.position: expected a count of batches, got {position!r}")
        if "loader" in state and self.stateful:
            rng = state["rng"]
            if not isinstance(rng, torch.Tensor) or rng.dtype != torch.uint8 or rng.shape != self._rng.shape:
                raise ValueError("data.rng: not a torch RNG state")
            epoch, epoch_batches = int(state["epoch"]), int(state["epoch_batches"])
            self.data.load_state_dict(state["loader"])
            self.position, self.epoch, self.epoch_batches = position, epoch, epoch_batches
            self._rng = rng.clone()
            note = {"resume": "restored", "batches": position,
                    "message": f"data: your loader's state_dict was restored: it goes on after the {position} "
                               "batches already read"}
        else:
            if not self.stateful:
                why = "your loader has no state_dict/load_state_dict" if "loader" not in state else \
                    "the checkpoint holds your loader's state, but the loader given now has no load_state_dict"
            else:
                why = "the checkpoint holds no state of your loader"
            if self.on_resume == "skip":
                self._pending_skip = position
                note = {"resume": "skip", "batches": position,
                        "message": f"data: {why}, so the stream is read again from its start and the {position} "
                                   "batches already seen are skipped (the same batches only if your loader is "
                                   "deterministic; a loader with state_dict, e.g. torchdata's StatefulDataLoader, "
                                   "restores the position without reading)"}
            else:
                note = {"resume": "restart", "batches": 0,
                        "message": f"data: {why} and on_resume='restart': the stream restarts from its first batch "
                                   f"(the {position} batches already seen are seen again)"}
        self._restored_note = note
        return note

    def resume_note(self) -> dict[str, Any] | None:
        return self._restored_note


# ---- helpers ----------------------------------------------------------------------------------


def _check_iterable(data: Any, name: str) -> None:
    if isinstance(data, (str, bytes, Mapping, torch.Tensor, np.ndarray)) or not isinstance(data, Iterable):
        raise TypeError(f"{name} must be an iterable of batches (a DataLoader, an IterableDataset, a generator, a "
                        f"list of tensors), got {type(data).__name__}")


def _spec_from_config(config: StackWiseConfig | None, world_size: int) -> BatchSpec:
    if config is None:
        raise DataError("your data needs a BatchSpec (batch_size, seq_len, vocab_size): pass one, or hand the data to a "
                        "TrainingMachine, which takes it from the config")
    vocab = config.model.vocab_size
    if vocab is None:
        raise DataError("model.vocab_size is required when training on your own data (data=...): set it to your "
                        "tokenizer's vocabulary size (every token id must be below it)")
    batch = config.training.batch_size
    if batch % world_size:
        raise DataError(f"training.batch_size {batch} cannot be split evenly over {world_size} ranks")
    objective = config.data.objective
    return BatchSpec(batch_size=batch // world_size, seq_len=config.training.seq_len, vocab_size=vocab,
                     objective=objective, attention_mode=ATTENTION_MODE[objective],
                     mask_rate=value_at(config.data.mask_rate, 0.0) if objective == "mlm" else None)


def _key(index: int | None, over: Any, field: str, base: str) -> str:
    return f"schedule[{index}].data_config.{field}" if index is not None and getattr(over, field) is not None else base


def _tensor(value: Any, name: str, where: str) -> torch.Tensor:
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, np.ndarray):
        if value.dtype.kind not in "iub":
            raise DataError(f"{where}: {name} is a numpy {value.dtype} array; token ids must be integers")
        return torch.from_numpy(np.ascontiguousarray(value.astype(np.int64) if value.dtype.kind == "u" else value))
    raise DataError(f"{where}: {name} is a {type(value).__name__}; expected a tensor (or a numpy array)")


def _set_epoch(data: Any, epoch: int) -> None:
    """What a training loop does before each pass over a DataLoader: tell a sampler that has
    `set_epoch` (a DistributedSampler) which pass this is, so each pass is shuffled anew."""
    for sampler in (getattr(data, "sampler", None), getattr(getattr(data, "batch_sampler", None), "sampler", None)):
        if callable(getattr(sampler, "set_epoch", None)):
            sampler.set_epoch(epoch)
            return


def _seeded_state(*parts: object) -> torch.Tensor:
    return torch.Generator().manual_seed(stable_seed(*parts)).get_state()


def _check_storable(value: Any, what: str) -> None:
    """A loader state is stored in state.pt, which a resume reads with
    `torch.load(weights_only=True)`: refuse now, at the checkpoint, what could not be read back
    (the same round trip, in memory)."""
    buffer = io.BytesIO()
    try:
        torch.save(value, buffer)
        buffer.seek(0)
        torch.load(buffer, weights_only=True)
    except Exception as err:  # pickling errors, torch's UnpicklingError naming the type
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        reason = f"it holds a {found.group(1)}" if found else \
            (str(err).splitlines()[0] if str(err) else type(err).__name__)
        raise DataError(f"your loader's {what} cannot be stored in a checkpoint, which is read back with "
                        f"torch.load(weights_only=True) ({reason}); make it return only dicts, lists, numbers, "
                        "strings and tensors") from None
