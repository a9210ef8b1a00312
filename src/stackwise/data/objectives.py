"""Training objectives as pure functions that turn token windows into (inputs, labels, loss weights).

- `clm`: causal next-token prediction; inputs = window[:-1], labels = window[1:].
- `mlm`: BERT-style; each position is selected with probability `rate`; a selected token becomes
  [MASK] (80%), a random non-special token (10%) or stays (10%); loss on selected positions.
- `diffusion`: absorbing-state masked diffusion (MDLM / LLaDA): a per-sample rate r ~ U[lo, hi],
  each position is masked with probability r, every masked token becomes [MASK], and the loss
  on masked positions is weighted by 1/r.

mlm and diffusion see T tokens and predict the same T tokens (no shift). Both guarantee at least
one selected position per sample (the position with the smallest draw), so no sample has an
empty loss. `eligible` (B, T bool, optional) limits selection to some positions (a user batch's
padding or `-100` labels: training/user_data.py); the draws are the same, an ineligible
position is simply never selected, and a sample without an eligible position has none.

Randomness never comes from global state: each sample's corruption is drawn from its own
`torch.Generator`, seeded by a blake2b hash of (seed, phase, sample id, objective, rate setting).
The same sample in the same phase is therefore corrupted identically in every epoch, which is
what lets a frozen trunk's activations be cached.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch

ATTENTION_MODE = {"clm": "causal", "mlm": "bidirectional", "diffusion": "bidirectional"}
OBJECTIVES = tuple(ATTENTION_MODE)

MLM_MASK, MLM_RANDOM = 0.8, 0.1  # of the selected positions; the remaining 10% stay unchanged


@dataclass(frozen=True)
class Corrupted:
    input_ids: torch.Tensor  # (B, T) long
    labels: torch.Tensor  # (B, T) long
    loss_mask: torch.Tensor  # (B, T) bool: positions in the loss
    loss_weight: torch.Tensor  # (B, T) float32: weight of each position's cross-entropy, 0 outside the loss
    mask_rates: torch.Tensor | None = None  # (B,) float32: the rate each sample was corrupted with


def stable_seed(*parts: object) -> int:
    """A 63-bit seed from a hash of `parts` (their reprs): the same on every machine and run,
    unlike Python's `hash`, which is salted per process for strings."""
    text = "\x1f".join(repr(p) for p in parts).encode()
    digest = hashlib.blake2b(text, digest_size=8, person=b"stackwise-seed").digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def sample_generator(*parts: object) -> torch.Generator:
    return torch.Generator().manual_seed(stable_seed(*parts))


def clm(windows: torch.Tensor) -> Corrupted:
    """(B, T+1) windows → causal LM inputs/labels of length T, every position in the loss."""
    inputs, labels = windows[:, :-1], windows[:, 1:]
    ones = torch.ones(labels.shape, dtype=torch.bool)
    return Corrupted(inputs.contiguous(), labels.contiguous(), ones, ones.float())


def mlm(
    tokens: torch.Tensor,
    sample_ids: Sequence[int],
    *,
    rate: float,
    mask_id: int,
    regular_ids: torch.Tensor,
    seed: int,
    phase: int | str,
    eligible: torch.Tensor | None = None,
) -> Corrupted:
    """(B, T) tokens → masked-LM inputs; labels are the original tokens, loss on selected positions."""
    if not 0 < rate <= 1:
        raise ValueError(f"mlm mask rate must lie in (0, 1], got {rate}")
    inputs = tokens.clone()
    selected = torch.zeros(tokens.shape, dtype=torch.bool)
    for b, sample_id in enumerate(sample_ids):
        g = sample_generator(seed, phase, int(sample_id), "mlm", float(rate))
        sel = _select(tokens.shape[1], rate, g, None if eligible is None else eligible[b])
        action = torch.rand(tokens.shape[1], generator=g)
        random_ids = regular_ids[torch.randint(len(regular_ids), (tokens.shape[1],), generator=g)]
        row = inputs[b]
        row[sel & (action < MLM_MASK)] = mask_id
        swap = sel & (action >= MLM_MASK) & (action < MLM_MASK + MLM_RANDOM)
        row[swap] = random_ids[swap]
        selected[b] = sel
    rates = torch.full((tokens.shape[0],), float(rate), dtype=torch.float32)
    return Corrupted(inputs, tokens.clone(), selected, selected.float(), rates)


def diffusion(
    tokens: torch.Tensor,
    sample_ids: Sequence[int],
    *,
    mask_range: tuple[float, float],
    mask_id: int,
    seed: int,
    phase: int | str,
    eligible: torch.Tensor | None = None,
) -> Corrupted:
    """(B, T) tokens → masked-diffusion inputs: rate r ~ U[lo, hi] per sample, masked → [MASK],
    loss weight 1/r on masked positions (the MDLM/LLaDA ELBO weight)."""
    lo, hi = (float(x) for x in mask_range)
    if not 0 < lo <= hi <= 1:
        raise ValueError(f"diffusion mask_range needs 0 < lo <= hi <= 1, got {mask_range}")
    inputs = tokens.clone()
    selected = torch.zeros(tokens.shape, dtype=torch.bool)
    weight = torch.zeros(tokens.shape, dtype=torch.float32)
    rates = torch.empty(tokens.shape[0], dtype=torch.float64)
    for b, sample_id in enumerate(sample_ids):
        g = sample_generator(seed, phase, int(sample_id), "diffusion", lo, hi)
        r = lo + (hi - lo) * torch.rand(1, generator=g, dtype=torch.float64).item()
        sel = _select(tokens.shape[1], r, g, None if eligible is None else eligible[b])
        inputs[b][sel] = mask_id
        selected[b] = sel
        weight[b][sel] = 1.0 / r
        rates[b] = r
    return Corrupted(inputs, tokens.clone(), selected, weight, rates.float())


def _select(length: int, rate: float, g: torch.Generator, eligible: torch.Tensor | None = None) -> torch.Tensor:
    """Positions whose uniform draw falls below `rate`; at least one (the smallest draw), among
    the `eligible` positions when given (none if no position is eligible)."""
    u = torch.rand(length, generator=g)
    if eligible is not None:
        if not bool(eligible.any()):
            return torch.zeros(length, dtype=torch.bool)
        u = torch.where(eligible, u, torch.full_like(u, 2.0))  # above any rate (≤ 1): never selected
    sel = u < rate
    if not sel.any():
        sel[u.argmin()] = True
    return sel
