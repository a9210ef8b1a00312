"""The trunk activation cache (DESIGN.md section 6).

While the top of the rack trains on a frozen trunk, the trunk's output for a sample depends only on
the sample (its tokens and their corruption, both pure functions of seed, phase and sample id).
So it is computed once per sample and reused whenever the sample comes again in the phase: a step
that reads it costs the trainable stacks alone, however deep the trunk is.

A sample comes again only when the phase's draws cross an epoch boundary of the data order, so the
cache is made only where that can happen (`expected_cache_hits` > 0; `cache_decision`). In a phase
that draws less than one epoch (single-epoch pretraining) no row would ever be read: the cache is
off, and the frozen trunk runs forward at every step (it still saves its backward, optimizer state
and kept activations). `run.activation_cache: true` forces it on anyway, with a warning.

Storage: one row of (seq_len, d_model) per distinct sample drawn, in the order samples first come:
in RAM up to a budget, beyond it appended to a file under the run directory. Both grow with the
rows stored (RAM in chunks, the file row by row), so memory and disk follow what is actually kept,
never the corpus size. A batch reads its cached rows and the trunk runs on its other samples
only (training/forward.py); rows are read back bit for bit, so a cached run computes what an
uncached run computes.

The cache lives for one *context*: (trunk version, phase, data settings). Any change of the trunk
(growth below the trainable stacks, unfreezing, new adapters) or of the data stream opens a new
context and drops every row.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import torch

SPILL_FILE = "activations.f32"
RAM_CHUNK_BYTES = 16 << 20  # RAM rows are allocated this much at a time, as rows arrive


# ---- when the cache can pay ---------------------------------------------------------------------


def expected_cache_hits(phase_draws: int, n_windows: int, offset_in_epoch: int = 0) -> int:
    """How many of a phase's `phase_draws` samples can repeat one drawn earlier in the phase.

    The data order is a permutation of the `n_windows` training windows per epoch, so no sample
    repeats before the draws cross an epoch boundary: the first `n_windows - offset_in_epoch`
    draws (what is left of the current epoch at the phase's start) are all distinct, and each draw
    after them can repeat one. Exact from an epoch's start (offset 0); otherwise an upper bound."""
    if n_windows <= 0 or phase_draws <= 0:
        return 0
    left_in_epoch = n_windows - offset_in_epoch % n_windows
    return max(0, phase_draws - left_in_epoch)


def distinct_draws(phase_draws: int, n_windows: int) -> int:
    """The most distinct samples a phase's draws can touch: the rows its cache can fill."""
    return max(0, min(phase_draws, n_windows))


def cache_off_reason(enabled: bool | str, first_trainable: int, objective: str, mask_rate: Any) -> str | None:
    """Why a phase cannot cache its trunk's output, or None when it can. The machine and the
    memory planner (`stackwise plan`) both ask this, so they agree on when the cache exists."""
    if enabled is False:
        return "run.activation_cache is false"
    if first_trainable == 0:
        return "the embedding or the bottom stack trains, so no frozen trunk lies below the trainable stacks"
    if objective == "mlm" and not isinstance(mask_rate, (int, float)):
        return "the mask rate ramps within the phase, so the trunk's input changes from step to step"
    return None


@dataclass(frozen=True)
class CacheDecision:
    """Whether a phase caches its trunk: `off` says why not (None: on); `warning`, why a forced
    cache will not be read; `draws`, `windows` and `hits` are the counts the decision rests on."""

    off: str | None
    warning: str | None = None
    draws: int = 0
    windows: int = 0
    hits: int = 0

    @property
    def on(self) -> bool:
        return self.off is None


def cache_decision(setting: bool | str, first_trainable: int, objective: str, mask_rate: Any, *, phase: str,
                   draws: int, n_windows: int, offset_in_epoch: int = 0) -> CacheDecision:
    """Whether phase `phase`, drawing `draws` samples of `n_windows` windows from `offset_in_epoch`
    into an epoch, caches its trunk under `run.activation_cache` = `setting` ("auto": only where a
    sample can repeat; true: wherever valid, with a warning when none can; false: never)."""
    reason = cache_off_reason(setting, first_trainable, objective, mask_rate)
    hits = expected_cache_hits(draws, n_windows, offset_in_epoch)
    counts = {"draws": draws, "windows": n_windows, "hits": hits}
    if reason is not None:
        return CacheDecision(off=reason, **counts)
    if hits > 0:
        return CacheDecision(off=None, **counts)
    left = n_windows - offset_in_epoch % n_windows if n_windows else 0
    within = "under one epoch" if left == n_windows else f"within the {left:,} left of the current epoch"
    idle = f"phase {phase!r} draws {draws:,} samples of {n_windows:,} windows ({within}), no sample repeats"
    if setting is True:
        return CacheDecision(off=None, warning=f"run.activation_cache is true, but {idle}: no hits are expected", **counts)
    return CacheDecision(off=idle, **counts)


# ---- the rows -----------------------------------------------------------------------------------


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class ActivationCache:
    """Rows of trunk output keyed by sample id (0 … n_samples-1). Each sample gets a slot when first
    stored: the first `ram_rows` slots in RAM, the next ones appended to a file in `spill_dir`."""

    def __init__(self, n_samples: int, seq_len: int, d_model: int, ram_budget_bytes: int, spill_dir: Path | None):
        self.shape = (seq_len, d_model)
        self.row_bytes = seq_len * d_model * 4  # stored in fp32: the trunk's output dtype on CPU
        self.n_samples = n_samples
        self.ram_rows = min(n_samples, max(0, ram_budget_bytes // self.row_bytes))  # RAM capacity
        self.file_rows = n_samples - self.ram_rows  # file capacity; the file holds `rows_in_file`
        self.slot = torch.full((n_samples,), -1, dtype=torch.int64)  # sample id → slot (-1: not stored)
        self.rows = 0  # slots handed out
        self._chunk_rows = max(1, min(self.ram_rows, RAM_CHUNK_BYTES // self.row_bytes))
        self._chunks: list[torch.Tensor] = []
        self.stats = CacheStats()
        self._own_dir = spill_dir is None
        self.spill_dir = Path(tempfile.mkdtemp(prefix="stackwise-cache-")) if spill_dir is None else spill_dir
        self.file: IO[bytes] | None = None  # opened at the first row that does not fit in RAM

    @property
    def filled(self) -> torch.Tensor:
        """Per sample id, whether its row is stored."""
        return self.slot >= 0

    @property
    def rows_in_file(self) -> int:
        return max(0, self.rows - self.ram_rows)

    @property
    def nbytes_ram(self) -> int:
        return sum(chunk.numel() for chunk in self._chunks) * 4

    @property
    def spill_path(self) -> Path:
        return self.spill_dir / SPILL_FILE

    def lookup(self, sample_ids: torch.Tensor) -> torch.Tensor | None:
        """The cached rows of these samples, or None unless every one is cached (counted)."""
        found, rows = self.lookup_rows(sample_ids)
        if not bool(found.all()):
            self.stats.misses += len(found)
            return None
        self.stats.hits += len(found)
        return rows

    def lookup_rows(self, sample_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Which of these samples are cached (a bool per sample) and their rows, in order (None
        when none is); not counted: the caller counts what it used (`stats`)."""
        slots = self.slot[sample_ids.cpu()]
        found = slots >= 0
        if not bool(found.any()):
            return found, None
        return found, torch.stack([self._row(int(s)) for s in slots[found]])

    def store(self, sample_ids: torch.Tensor, hidden: torch.Tensor) -> None:
        """Keep the rows of samples not stored yet (a sample seen twice in one batch, across an
        epoch boundary, is kept once: both rows are the same)."""
        values = hidden.detach().to("cpu", torch.float32)
        spilled = []
        for i, row in zip(sample_ids.cpu().tolist(), values, strict=True):
            if int(self.slot[i]) >= 0:
                continue
            slot = self.rows
            self.slot[i] = slot
            self.rows += 1
            if slot < self.ram_rows:
                self._ram_row(slot).copy_(row)
            else:
                spilled.append(row)
        if spilled:
            self._append(torch.stack(spilled))

    def _ram_row(self, slot: int) -> torch.Tensor:
        chunk, within = divmod(slot, self._chunk_rows)
        if chunk == len(self._chunks):  # RAM grows a chunk at a time, as rows arrive
            size = min(self._chunk_rows, self.ram_rows - chunk * self._chunk_rows)
            self._chunks.append(torch.empty((size, *self.shape), dtype=torch.float32))
        return self._chunks[chunk][within]

    def _append(self, rows: torch.Tensor) -> None:
        """Rows past RAM go to the end of the spill file, which grows by exactly what it holds."""
        if self.file is None:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            self.file = open(self.spill_path, "w+b")  # noqa: SIM115 (open for the cache's life; close() closes it)
        self.file.seek(0, 2)
        self.file.write(rows.contiguous().numpy().tobytes())
        self.file.flush()  # on disk now: the file's size is what it holds

    def _row(self, slot: int) -> torch.Tensor:
        if slot < self.ram_rows:
            chunk, within = divmod(slot, self._chunk_rows)
            return self._chunks[chunk][within]
        row = np.empty(self.shape, dtype=np.float32)
        self.file.seek((slot - self.ram_rows) * self.row_bytes)
        self.file.readinto(memoryview(row).cast("B"))
        return torch.from_numpy(row)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None
        self.spill_path.unlink(missing_ok=True)
        self._chunks = []
        if self._own_dir:
            shutil.rmtree(self.spill_dir, ignore_errors=True)


class TrunkCache:
    """Decides when caching is valid, and holds the ActivationCache of the current context."""

    def __init__(self, ram_budget_mb: int, spill_dir: Path | None):
        self.ram_budget_bytes = ram_budget_mb * 2**20
        self.spill_dir = spill_dir
        self.cache: ActivationCache | None = None
        self.context: Any = None
        self.reason = "not started"

    @property
    def active(self) -> bool:
        return self.cache is not None

    def enter(self, context: Any, decision: CacheDecision, n_samples: int, seq_len: int, d_model: int) -> str:
        """Open a new context (dropping the old rows), as `decision` (from `cache_decision`) says.
        Returns a line saying whether the cache is on, and if not, why; a forced cache that will not
        be read says so."""
        self.close()
        self.context = context
        if decision.off:
            self.reason = decision.off
            return f"activation cache off: {decision.off}"
        self.cache = ActivationCache(n_samples, seq_len, d_model, self.ram_budget_bytes, self.spill_dir)
        self.reason = "on"
        rows = distinct_draws(decision.draws, n_samples)
        in_ram = min(rows, self.cache.ram_rows)
        spill = f", the rest in {self.cache.spill_path}" if rows > in_ram else ""
        line = (f"activation cache on: {decision.draws:,} draws of {n_samples:,} windows, "
                f"up to {rows:,} rows kept ({in_ram:,} in RAM{spill})")
        if decision.warning:
            return f"{line}; warning: {decision.warning}"
        return f"{line}, up to {decision.hits:,} draws can read one"

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None
