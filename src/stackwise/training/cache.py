"""The trunk activation cache (DESIGN.md section 6).

While the top of the rack trains on a frozen trunk, the trunk's output for a sample depends only on
the sample (its tokens and their corruption, both pure functions of seed, phase and sample id).
So it is computed once per sample and reused in every later epoch of the phase: a step then costs
the trainable stacks alone, however deep the trunk is.

Storage: one row of (seq_len, d_model) per training window, in RAM up to a budget and beyond it in
a memory-mapped file under the run directory. Rows are only ever written whole, for a whole batch
computed together, so a cached run computes exactly what an uncached run computes.

The cache lives for one *context*: (trunk version, phase, data settings). Any change of the trunk
(growth below the trainable stacks, unfreezing, new adapters) or of the data stream opens a new
context and drops every row.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch


@dataclass
class CacheStats:
    hits: int = 0
    misses: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class ActivationCache:
    """Rows of trunk output indexed by sample id, RAM first, then a file."""

    def __init__(self, n_samples: int, seq_len: int, d_model: int, ram_budget_bytes: int, spill_dir: Path | None):
        self.shape = (seq_len, d_model)
        row_bytes = seq_len * d_model * 4  # stored in fp32: the trunk's output dtype on CPU
        self.n_samples = n_samples
        self.ram_rows = min(n_samples, max(0, ram_budget_bytes // row_bytes))
        self.file_rows = n_samples - self.ram_rows
        self.ram = torch.empty((self.ram_rows, *self.shape), dtype=torch.float32)
        self.filled = torch.zeros(n_samples, dtype=torch.bool)
        self.stats = CacheStats()
        self._own_dir = spill_dir is None
        self.spill_dir = Path(tempfile.mkdtemp(prefix="stackwise-cache-")) if spill_dir is None else spill_dir
        self.file: np.memmap | None = None
        if self.file_rows:
            self.spill_dir.mkdir(parents=True, exist_ok=True)
            self.file = np.memmap(self.spill_dir / "activations.f32", dtype=np.float32, mode="w+",
                                  shape=(self.file_rows, *self.shape))

    @property
    def nbytes_ram(self) -> int:
        return self.ram.numel() * 4

    def lookup(self, sample_ids: torch.Tensor) -> torch.Tensor | None:
        """The cached rows of these samples, or None unless every one is cached."""
        ids = sample_ids.cpu()
        if not bool(self.filled[ids].all()):
            self.stats.misses += len(ids)
            return None
        self.stats.hits += len(ids)
        return torch.stack([self._row(int(i)) for i in ids])

    def store(self, sample_ids: torch.Tensor, hidden: torch.Tensor) -> None:
        values = hidden.detach().to("cpu", torch.float32)
        for i, row in zip(sample_ids.cpu().tolist(), values, strict=True):
            if i < self.ram_rows:
                self.ram[i] = row
            else:
                self.file[i - self.ram_rows] = row.numpy()
            self.filled[i] = True

    def _row(self, i: int) -> torch.Tensor:
        if i < self.ram_rows:
            return self.ram[i]
        return torch.from_numpy(np.array(self.file[i - self.ram_rows]))

    def close(self) -> None:
        if self.file is not None:
            del self.file
            self.file = None
            (self.spill_dir / "activations.f32").unlink(missing_ok=True)
        if self._own_dir:
            shutil.rmtree(self.spill_dir, ignore_errors=True)


def cache_off_reason(enabled: bool, first_trainable: int, objective: str, mask_rate: Any) -> str | None:
    """Why a phase cannot cache its trunk's output, or None when it can. The machine and the
    memory planner (`stackwise plan`) both ask this, so they agree on when the cache exists."""
    if not enabled:
        return "run.activation_cache is false"
    if first_trainable == 0:
        return "the embedding or the bottom stack trains, so no frozen trunk lies below the trainable stacks"
    if objective == "mlm" and not isinstance(mask_rate, (int, float)):
        return "the mask rate ramps within the phase, so the trunk's input changes from step to step"
    return None


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

    def enter(self, context: Any, reason_off: str | None, n_samples: int, seq_len: int, d_model: int) -> str:
        """Open a new context (dropping the old rows). Returns a line saying whether the cache is
        on, and if not, why (`reason_off`, from `cache_off_reason`)."""
        self.close()
        self.context = context
        if reason_off:
            self.reason = reason_off
            return f"activation cache off: {reason_off}"
        self.cache = ActivationCache(n_samples, seq_len, d_model, self.ram_budget_bytes, self.spill_dir)
        self.reason = "on"
        spill = f", {self.cache.file_rows} in {self.spill_dir}" if self.cache.file_rows else ""
        return f"activation cache on: {n_samples} samples, {self.cache.ram_rows} in RAM{spill}"

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close()
            self.cache = None
