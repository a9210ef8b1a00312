"""Key/value cache for causal generation.

Without it, every new token runs the whole context through the rack again. With it, each
attention layer keeps the keys and values of the positions already seen, so a new token runs one
position: `model.rack(embedding(new_ids), "causal", cache=cache)` places the new positions after
the `cache.length` cached ones (RoPE at their true positions), attends over all of them, stores
their keys and values and advances `length`. The cache is for inference (no autograd) and for the
whole rack (every stack, in order).
"""

from __future__ import annotations

import torch
from torch import nn


class KVCache:
    """Keys and values of every attention layer for one batch of sequences, up to `max_len`
    positions. Each layer's buffers are allocated at its first call, in the dtype and on the
    device of its keys and values (mha/gqa cache their n_kv_heads heads, before the GQA repeat;
    mla caches its expanded keys, RoPE part included, and values)."""

    def __init__(self, max_len: int):
        if max_len < 1:
            raise ValueError(f"a KV cache needs room for at least one position, got max_len={max_len}")
        self.max_len = max_len
        self.length = 0
        self._layers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._filled: dict[int, int] = {}  # positions each layer holds: `length` between calls

    def append(self, layer: nn.Module, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store `layer`'s keys and values (B, H, T, d) of positions [length, length + T) and return
        its keys and values of positions [0, length + T) (views into the buffers)."""
        end = self.length + keys.shape[2]
        if end > self.max_len:
            raise ValueError(f"the KV cache holds {self.max_len} positions; {end} were asked for")
        key = id(layer)
        if key not in self._layers:
            batch, heads, _, _ = keys.shape
            self._layers[key] = (keys.new_empty(batch, heads, self.max_len, keys.shape[-1]),
                                 values.new_empty(batch, heads, self.max_len, values.shape[-1]))
            self._filled[key] = 0
        cached_keys, cached_values = self._layers[key]
        if self._filled[key] != self.length:
            raise ValueError("an attention layer ran twice in one pass (a module shared between blocks): "
                             "a KV cache keeps one set of keys and values per layer")
        if keys.shape[:2] != cached_keys.shape[:2]:
            raise ValueError(f"this KV cache holds batch × heads {tuple(cached_keys.shape[:2])}, "
                             f"got {tuple(keys.shape[:2])}: use one cache per batch of sequences")
        cached_keys[:, :, self.length : end] = keys
        cached_values[:, :, self.length : end] = values
        self._filled[key] = end
        return cached_keys[:, :, :end], cached_values[:, :, :end]
