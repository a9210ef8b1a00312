"""`ProgressiveDataLoader`: the data plane of a run, one phase's settings at a time.

It is the last stage of the data pipeline (stackwise.data.pipeline: documents → tokens → shards
→ windows): it has each corpus prepared (or mapped from the token cache) and serves windows of
the memory-mapped shards. `prepare=False` defers even that until a batch or a count is asked for
(generation needs only the run's tokenizer).

A batch is a pure function of (training.seed, phase index, step, phase settings): there is no
iterator state, so after a resume any step's batch is regenerated exactly. The training split is
cut into fixed, non-overlapping windows of seq_len+1 tokens (sample id = window index); each
(seed, order, epoch) has its own seeded permutation of the windows, and the i-th sample of step s
is window `perm[g % n_windows]` of epoch `g // n_windows`, with
`g = order_offset + (s - phase_start_step) · batch_size + i`. The machine gives phases on the same
corpus one order and a run-wide sample counter (`schedule.data_orders`), so no window repeats
before an epoch ends across a phase boundary; by default a phase has its own order (its index).

`configure(validation="all")` makes every document of the corpus validation (no training split):
what scoring a whole file (`stackwise eval RUN --data FILE`) needs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stackwise.config import Ramp, StackWiseConfig, value_at
from stackwise.data.batch import Batch
from stackwise.data.cache import check_cache_dir, resolve_cache_dir
from stackwise.data.corpus import CorpusSource, describe, open_corpus
from stackwise.data.dummy import dummy_token_splits
from stackwise.data.errors import DataError
from stackwise.data.objectives import ATTENTION_MODE, clm, diffusion, mlm, stable_seed
from stackwise.data.pipeline import corpus_tokenizer, prepare_tokens
from stackwise.data.token_cache import TokenSplits
from stackwise.data.tokenizer import DummyTokenizer, Tokenizer, check_vocab
from stackwise.training.schedule import data_settings

if TYPE_CHECKING:
    from stackwise.specs import BatchSpec

# Validation corruption does not depend on training.seed or the phase, so runs with different
# seeds, and different phases with the same settings, are scored on exactly the same inputs.
VALIDATION_SEED = 0


@dataclass(frozen=True)
class DataSettings:
    """What a phase decides about its data."""

    phase_index: int
    seq_len: int
    batch_size: int
    objective: str
    mask_rate: float | Ramp
    mask_range: tuple[float, float]
    paths: tuple[str, ...]
    text_field: str
    validation: str = "split"  # "split": the corpus's validation split; "all": every document
    order: int | None = None  # the window order drawn from (None: the phase's own, phase_index)
    order_offset: int = 0  # samples of that order drawn before this phase's first step

    @property
    def attention_mode(self) -> str:
        return ATTENTION_MODE[self.objective]


class ProgressiveDataLoader:
    """Corpus + tokenizer + token cache, and the per-phase batch stream."""

    def __init__(
        self,
        config: StackWiseConfig | Mapping[str, Any] | str | os.PathLike[str],
        *,
        run_dir: str | os.PathLike[str] | None = None,
        prepare: bool = True,
    ):
        """`prepare=False`: read no corpus until a batch or a count needs one (generation and
        scoring another file need only the run's tokenizer: data.tokenizer.path)."""
        self.config = StackWiseConfig.load(config)
        self._prepare = prepare
        data = self.config.data
        self.seed = self.config.training.seed
        self.cache_dir = resolve_cache_dir(data.cache_dir)
        self._streams: dict[tuple[tuple[str, ...], str, str], TokenSplits] = {}
        self._sources: dict[tuple[tuple[str, ...], str], CorpusSource] = {}
        base = (tuple(data.paths), data.text_field, "split")
        if not data.use_dummy_data:
            check_cache_dir(self.cache_dir)  # a file where the cache folder should be: before any reading
        if data.use_dummy_data:
            self.tokenizer: Tokenizer = DummyTokenizer(self.config.model.vocab_size or 512)
            self._streams[base] = dummy_token_splits(self.tokenizer)
        else:
            # Stages documents → tokens → shards (stackwise.data.pipeline); this loader serves windows.
            trains_bpe = data.tokenizer.kind == "bpe" and not data.tokenizer.path
            source = self._source(base[0], base[1]) if prepare or trains_bpe else None
            made = corpus_tokenizer(source, kind=data.tokenizer.kind, vocab_size=data.tokenizer.vocab_size,
                                    path=data.tokenizer.path, train_bytes=data.tokenizer.train_bytes,
                                    val_fraction=data.val_fraction, cache_dir=self.cache_dir)
            self.tokenizer = made.tokenizer
            check_vocab(self.config.model.vocab_size, self.tokenizer.vocab_size)
            if prepare:
                self._streams[base] = prepare_tokens(source, self.tokenizer, val_fraction=data.val_fraction,
                                                     cache_dir=self.cache_dir, bin_dtype=data.bin_dtype, plan=made.plan)
        if run_dir is not None:
            self.tokenizer.save(run_dir)
        self._byte_lengths = torch.from_numpy(self.tokenizer.token_byte_lengths)
        prefix = self.tokenizer.dummy_prefix_bytes
        self._prefix_bytes = None if prefix is None else torch.from_numpy(prefix)
        self._regular_ids = torch.from_numpy(self.tokenizer.regular_ids)
        if prepare:
            self._check_schedule()
        self.configure()

    # ---- settings ---------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def settings(self) -> DataSettings:
        return self._settings

    def configure(
        self,
        *,
        phase_index: int = 0,
        seq_len: int | None = None,
        batch_size: int | None = None,
        objective: str | None = None,
        mask_rate: float | Ramp | None = None,
        mask_range: tuple[float, float] | None = None,
        paths: Sequence[str] | None = None,
        text_field: str | None = None,
        validation: str | None = None,
        order: int | None = None,
        order_offset: int = 0,
    ) -> DataSettings:
        """Set the data settings of a phase; anything not given comes from the base config.
        `validation="all"`: every document of the corpus is validation (to score a whole corpus;
        there are then no training batches). `order` / `order_offset`: continue the window order
        `order` after its first `order_offset` samples (phases sharing a corpus; default: the
        phase's own order from its start)."""
        data, training = self.config.data, self.config.training
        settings = DataSettings(
            phase_index=phase_index,
            seq_len=seq_len if seq_len is not None else training.seq_len,
            batch_size=batch_size if batch_size is not None else training.batch_size,
            objective=objective if objective is not None else data.objective,
            mask_rate=mask_rate if mask_rate is not None else data.mask_rate,
            mask_range=tuple(mask_range) if mask_range is not None else tuple(data.mask_range),
            paths=tuple(paths) if paths is not None else tuple(data.paths),
            text_field=text_field if text_field is not None else data.text_field,
            validation=validation if validation is not None else "split",
            order=order,
            order_offset=order_offset,
        )
        if settings.objective not in ATTENTION_MODE:
            raise ValueError(
                f"unknown objective {settings.objective!r}; expected one of {', '.join(ATTENTION_MODE)}"
            )
        if settings.validation not in ("split", "all"):
            raise ValueError(f"validation must be 'split' or 'all', got {settings.validation!r}")
        self._settings, self._prepared = settings, None
        if self._prepare:
            self._prepare_tokens()  # read (or map) the corpus and check its size now, not at the first batch
        return settings

    @property
    def _tokens(self) -> TokenSplits:
        return self._prepared if self._prepared is not None else self._prepare_tokens()

    def _prepare_tokens(self) -> TokenSplits:
        s = self._settings
        stream = self._stream(s.paths, s.text_field, s.validation)
        _check_size(stream, s.seq_len, with_train=s.validation == "split")
        self._prepared = stream
        return stream

    def get_batch_spec(self, tau: float = 0.0) -> BatchSpec:
        from stackwise.specs import BatchSpec

        s = self._settings
        rate = value_at(s.mask_rate, tau) if s.objective == "mlm" else None
        return BatchSpec(
            batch_size=s.batch_size,
            seq_len=s.seq_len,
            vocab_size=self.vocab_size,
            objective=s.objective,
            attention_mode=s.attention_mode,
            mask_rate=rate,
        )

    # ---- batches ----------------------------------------------------------------------------

    @property
    def n_train_tokens(self) -> int:
        return len(self._tokens.train)

    @property
    def n_train_windows(self) -> int:
        return len(self._tokens.train) // (self._settings.seq_len + 1)

    @property
    def n_val_windows(self) -> int:
        width, n = self._settings.seq_len + 1, len(self._tokens.val)
        return (n - width) // self._val_stride + 1 if n >= width else 0

    @property
    def _val_stride(self) -> int:
        """Validation windows start every seq_len+1 tokens (no overlap, as training's); when every
        document is validation (scoring a whole corpus) every seq_len tokens, so that consecutive
        windows share one token and every token but the stream's first is predicted once."""
        s = self._settings
        return s.seq_len if s.validation == "all" else s.seq_len + 1

    def batch_at(self, step: int, tau: float = 0.0, phase_start_step: int = 0, *, rank: int = 0, world_size: int = 1) -> Batch:
        """The batch of global step `step` in the current phase (τ = the phase's local time).

        With `world_size` > 1, only rank `rank`'s rows of it: the global batch is cut into
        `world_size` equal consecutive slices, and every row is the same sample, corrupted the
        same way, as in the whole batch."""
        s = self._settings
        if step < phase_start_step:
            raise ValueError(f"step {step} is before the phase start {phase_start_step}")
        if s.batch_size % world_size:
            raise ValueError(f"a batch of {s.batch_size} rows cannot be split evenly over {world_size} ranks")
        rows = s.batch_size // world_size
        n = self.n_train_windows
        if n == 0:
            raise DataError(f"{self._tokens.name}: no training split (every document is validation); "
                            "configure(validation='split') to train", self._tokens.name)
        # g: this row's place in the order (a run-wide sample counter when phases share it).
        g = s.order_offset + (step - phase_start_step) * s.batch_size + rank * rows + np.arange(rows)
        order = s.phase_index if s.order is None else s.order
        window_ids = np.empty(rows, dtype=np.int64)
        for epoch in np.unique(g // n):
            here = g // n == epoch
            window_ids[here] = _permutation(self.seed, order, int(epoch), n)[g[here] % n]
        return self._make_batch(
            self._tokens.train, window_ids, value_at(s.mask_rate, tau), self.seed, s.phase_index
        )

    def __iter__(self) -> Iterator[Batch]:
        step = 0
        while True:
            yield self.batch_at(step)
            step += 1

    def validation_batches(self, max_batches: int | None = None, *, tau: float = 0.0) -> Iterator[Batch]:
        """The fixed validation set: consecutive windows of the validation split, in order, with
        corruption seeded independently of training.seed; the last batch may be smaller. With
        `validation="all"` consecutive windows overlap by one token (see `_val_stride`)."""
        s = self._settings
        n = self.n_val_windows
        starts = range(0, n, s.batch_size)
        if max_batches is not None:
            starts = starts[:max_batches]
        rate = value_at(s.mask_rate, tau)
        for start in starts:
            window_ids = np.arange(start, min(start + s.batch_size, n), dtype=np.int64)
            yield self._make_batch(self._tokens.val, window_ids, rate, VALIDATION_SEED, "validation", self._val_stride)

    def validation_coverage(self, max_batches: int | None = None) -> dict[str, Any]:
        """What `validation_batches(max_batches)` scores: `bytes` (the exact text bytes of the
        positions its windows predict: window[1:] for clm, window[:-1] for mlm and diffusion),
        `documents` (those with at least one such position), against the split's `total_bytes`
        and `total_documents`, `windows`, and the `corpus` they come from. A trailing part shorter
        than one window is not scored (nor, with the split's non-overlapping windows, one token
        per window), so `bytes` falls a little short of `total_bytes`."""
        s, tokens = self._settings, self._tokens.val
        stride, eos = self._val_stride, self.tokenizer.eos_id
        n = self.n_val_windows if max_batches is None else min(self.n_val_windows, max_batches * s.batch_size)
        first = 1 if s.objective == "clm" else 0  # a window's first predicted position
        end = (n - 1) * stride + first + s.seq_len if n else 0  # past the last predicted position
        scored_bytes, documents, last_doc, doc_base = 0, 0, -1, -1
        for p0 in range(0, end, 1 << 22):
            part = np.asarray(tokens[p0 : min(end, p0 + (1 << 22))]).astype(np.int64)
            pos = np.arange(p0, p0 + part.size)
            scored = (pos >= first) & ((pos - first) % stride < s.seq_len)
            previous = np.concatenate(([int(tokens[p0 - 1]) if p0 else eos], part[:-1]))
            lengths = self.tokenizer.token_byte_lengths[part]
            if self._prefix_bytes is not None:  # a token opening a document: its dummy prefix is not text
                lengths = lengths - self.tokenizer.dummy_prefix_bytes[part] * (previous == eos)
            scored_bytes += int(lengths[scored].sum())
            doc = doc_base + np.cumsum(previous == eos)  # each position's document: [EOS] seen before it
            doc_base = int(doc[-1])
            ids = np.unique(doc[scored & (part != eos)])
            documents += int(ids.size) - int(ids.size > 0 and ids[0] == last_doc)
            if ids.size:
                last_doc = int(ids[-1])
        return {"bytes": scored_bytes, "total_bytes": self._tokens.val_bytes, "documents": documents,
                "total_documents": self._tokens.val_docs, "windows": n, "corpus": self._tokens.name}

    def _make_batch(
        self, tokens: np.ndarray, window_ids: np.ndarray, rate: float, seed: int, phase: int | str,
        stride: int | None = None,
    ) -> Batch:
        s = self._settings
        width = s.seq_len + 1
        stride = stride or width  # window i starts at token i * stride
        gathered = tokens[window_ids[:, None] * stride + np.arange(width)]
        if gathered.size and int(gathered.max()) >= self.tokenizer.vocab_size:
            self._bad_ids(tokens, window_ids, gathered, stride)
        windows = torch.from_numpy(gathered.astype(np.int64))
        ids = window_ids.tolist()
        if s.objective == "clm":
            c = clm(windows)
        elif s.objective == "mlm":
            c = mlm(
                windows[:, :-1],
                ids,
                rate=rate,
                mask_id=self.tokenizer.mask_id,
                regular_ids=self._regular_ids,
                seed=seed,
                phase=phase,
            )
        else:
            c = diffusion(
                windows[:, :-1],
                ids,
                mask_range=s.mask_range,
                mask_id=self.tokenizer.mask_id,
                seed=seed,
                phase=phase,
            )
        # Diffusion's weighted loss bounds the NLL of the whole window, so all its tokens are targets.
        targets = c.labels if s.objective == "diffusion" else c.labels[c.loss_mask]
        n_bytes = self._byte_lengths[targets].sum()
        if self._prefix_bytes is not None:  # a token opening a document: its dummy prefix is not text
            before = tokens[np.maximum(window_ids * stride - 1, 0)].astype(np.int64)
            before[window_ids == 0] = self.tokenizer.eos_id  # the stream's first token opens a document
            previous = windows[:, :-1] if s.objective == "clm" else torch.cat(
                [torch.from_numpy(before)[:, None], windows[:, :-2]], dim=1)
            opening = previous == self.tokenizer.eos_id
            if s.objective != "diffusion":
                opening = opening[c.loss_mask]
            n_bytes = n_bytes - self._prefix_bytes[targets[opening]].sum()
        return Batch(
            input_ids=c.input_ids,
            labels=c.labels,
            loss_mask=c.loss_mask,
            loss_weight=c.loss_weight,
            sample_ids=torch.from_numpy(window_ids),
            attention_mode=s.attention_mode,
            objective=s.objective,
            n_target_tokens=int(targets.numel()),
            n_target_bytes=int(n_bytes),
            mask_rates=c.mask_rates,
        )

    def _bad_ids(self, tokens: np.ndarray, window_ids: np.ndarray, gathered: np.ndarray, stride: int) -> None:
        """Token ids beyond the vocabulary can only come from a damaged (or foreign) token file:
        name it, never let an IndexError (or a device-side assert on CUDA) happen downstream."""
        split = "train" if tokens is self._tokens.train else "val"
        row, col = np.argwhere(gathered >= self.tokenizer.vocab_size)[0]
        position = int(window_ids[row]) * stride + int(col)
        source = self._tokens.source(split)
        folder = f"delete {os.path.dirname(source)} to rebuild it" if self._tokens.train_file else "check the data"
        raise DataError(
            f"{source}: token id {int(gathered[row, col])} at position {position} is outside the tokenizer's "
            f"vocabulary ({self.tokenizer.vocab_size} ids): the token file is damaged; {folder}",
            source,
        )

    # ---- corpora ----------------------------------------------------------------------------

    def _stream(self, paths: tuple[str, ...], text_field: str, validation: str = "split") -> TokenSplits:
        """Token streams of a corpus, tokenized with the run's tokenizer (prepared once per run)."""
        key = (paths, text_field, validation)
        if key not in self._streams:
            if isinstance(self.tokenizer, DummyTokenizer):
                raise DataError(
                    f"data.use_dummy_data is true, but a phase asks for the corpus {describe(list(paths)) or 'built-in'}; "
                    "drop the phase's data_config.paths or set data.use_dummy_data: false"
                )
            data = self.config.data
            self._streams[key] = prepare_tokens(
                self._source(paths, text_field), self.tokenizer, cache_dir=self.cache_dir, bin_dtype=data.bin_dtype,
                val_fraction=1.0 if validation == "all" else data.val_fraction,
            )
        return self._streams[key]

    def prepared_streams(self) -> list[TokenSplits]:
        """The token streams prepared so far (the base corpus and each phase's), in order."""
        return list(self._streams.values())

    def _source(self, paths: tuple[str, ...], text_field: str) -> CorpusSource:
        """The corpus at `paths`, resolved and fingerprinted (hashing its files) once per loader."""
        if (paths, text_field) in self._sources:
            return self._sources[paths, text_field]
        source = open_corpus(paths, text_field, self.config.data.include)
        if source.token_files and not self.config.data.tokenizer.path:
            # Token files hold ids of one tokenizer: the run must load it, never train its own.
            raise DataError(
                f"{source.name}: token files (.bin) need the tokenizer that wrote them: set data.tokenizer.path "
                "to its tokenizer.json (for nanoGPT's GPT-2 files, GPT-2's tokenizer.json)",
                source.token_files[0],
            )
        self._sources[paths, text_field] = source
        return source

    def _check_schedule(self) -> None:
        # Fail at construction, not hours into a run, if a later phase's corpus or seq_len cannot work.
        for phase in self.config.schedule or []:
            settings = data_settings(self.config, phase.data_config, phase.task, tau=None)
            _check_size(self._stream(tuple(settings["paths"]), settings["text_field"]), settings["seq_len"])


def _check_size(stream: TokenSplits, seq_len: int, with_train: bool = True) -> None:
    width = seq_len + 1
    for split, tokens, fix in (
        ("training", stream.train if with_train else None, "add text to the corpus or lower training.seq_len"),
        (
            "validation",
            stream.val,
            "raise data.val_fraction, add text to the corpus, or lower training.seq_len",
        ),
    ):
        if tokens is None:
            continue
        if len(tokens) < width:
            raise DataError(
                f"{stream.name}: the {split} split has {len(tokens)} tokens, fewer than one sequence of "
                f"seq_len+1 = {width} tokens; {fix}",
                stream.name,
            )


@lru_cache(maxsize=8)
def _permutation(seed: int, order: int, epoch: int, n: int) -> np.ndarray:
    """The window order of one epoch of one order (cached: consecutive steps share it). An order
    is named by the index of the first phase that draws from it, so a run's first phase draws
    the permutations it always has."""
    return np.random.default_rng(stable_seed("permutation", seed, order, epoch, n)).permutation(n)
