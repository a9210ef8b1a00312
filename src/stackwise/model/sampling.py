"""Text generation from a StackWiseModel: autoregressive sampling for clm models, iterative
unmasking (MaskGIT / LLaDA low-confidence remasking) for mlm and masked-diffusion models.

Both work on token ids and return only the new ids; `generate_text` adds the tokenizer on both
ends and picks the algorithm from the run's objective. See docs/generation.md.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from stackwise.model.kv_cache import KVCache

STRATEGIES = ("confidence", "random")
MASKED_OBJECTIVES = ("mlm", "diffusion")


# ---- shared pieces --------------------------------------------------------------------------


@contextmanager
def _inference(model: nn.Module) -> Iterator[None]:
    """eval mode and no autograd for the duration, then the caller's train/eval mode back."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A private generator: a seed makes a run reproducible without touching torch's global RNG."""
    if seed is not None and (not isinstance(seed, int) or not 0 <= seed < 2**63):
        raise ValueError(f"seed must be an integer in [0, 2**63), got {seed!r}")
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()  # fresh, non-deterministic
    else:
        gen.manual_seed(seed)
    return gen


def _check_sampling(temperature: float, top_k: int | None) -> None:
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1 (or None for no filtering), got {top_k}")


def _ban_mask(vocab_size: int, banned_ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """Bool (vocab,) of ids sampling may never pick."""
    banned = torch.zeros(vocab_size, dtype=torch.bool, device=device)
    ids = sorted({int(i) for i in banned_ids})
    if ids and not 0 <= ids[0] <= ids[-1] < vocab_size:
        raise ValueError(f"banned ids must lie in [0, {vocab_size}), got {ids[0]}..{ids[-1]}")
    banned[ids] = True
    if bool(banned.all()):
        raise ValueError("every id of the vocabulary is banned: nothing left to sample")
    return banned


def _check_ids(ids: Sequence[int], vocab_size: int, what: str) -> None:
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise ValueError(f"{what} holds ids outside the model's vocabulary [0, {vocab_size}): {bad[:4]}")


def sample_tokens(
    logits: torch.Tensor,
    *,
    temperature: float,
    top_k: int | None,
    banned: torch.Tensor,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pick one id per row of `logits` (N, V). Returns (ids (N,), confidence (N,)): the
    probability the (tempered, filtered) distribution gives the picked id. At temperature 0
    the pick is the argmax and its confidence is the plain softmax probability."""
    _check_sampling(temperature, top_k)
    logits = logits.float().masked_fill(banned, float("-inf"))
    if temperature == 0:
        probs = logits.softmax(-1)
        ids = probs.argmax(-1)
    else:
        logits = logits / temperature
        if top_k is not None and top_k < logits.shape[-1]:
            kth = logits.topk(top_k, dim=-1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        probs = logits.softmax(-1)
        ids = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return ids, probs.gather(-1, ids[:, None]).squeeze(-1)


@dataclass
class _Sampler:
    """The sampling settings of one generation call, so the loops pass one object around."""

    temperature: float
    top_k: int | None
    banned: torch.Tensor
    generator: torch.Generator

    @classmethod
    def build(
        cls, model: Any, temperature: float, top_k: int | None, seed: int | None, banned_ids: Sequence[int]
    ) -> _Sampler:
        _check_sampling(temperature, top_k)
        device = _device(model)
        return cls(temperature, top_k, _ban_mask(model.vocab_size, banned_ids, device), _generator(device, seed))

    def __call__(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return sample_tokens(
            logits, temperature=self.temperature, top_k=self.top_k, banned=self.banned, generator=self.generator
        )


# ---- causal (clm) ---------------------------------------------------------------------------


def generate_causal(
    model: Any,
    prompt_ids: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    stop_id: int | None = None,
    banned_ids: Sequence[int] = (),
    kv_cache: bool = True,
) -> list[int]:
    """Sample up to `max_new_tokens` ids after `prompt_ids`, one at a time, with causal attention.

    The model sees at most its last `cfg.max_seq_len` positions. Stops early after producing
    `stop_id` (which is included in the result). Returns only the new ids.

    With `kv_cache` (the default) the prompt runs once and each new token runs one position,
    attending to the keys and values kept from the earlier ones, for as long as the sequence fits
    in `max_seq_len`. Past that the window slides, every position moves, and each step runs the
    whole window again (what `kv_cache=False` does at every step).
    """
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if not prompt_ids:
        raise ValueError("causal generation needs at least one prompt token to condition on")
    _check_ids(prompt_ids, model.vocab_size, "the prompt")
    sample = _Sampler.build(model, temperature, top_k, seed, banned_ids)
    device, window = _device(model), model.cfg.max_seq_len
    # One buffer for prompt and output: each step reads a view of its last `window` positions.
    seq = torch.empty(len(prompt_ids) + max_new_tokens, dtype=torch.long, device=device)
    seq[: len(prompt_ids)] = torch.tensor(prompt_ids, dtype=torch.long)
    end = len(prompt_ids)
    cache = KVCache(min(window, seq.numel())) if kv_cache else None
    with _inference(model):
        while end < seq.numel():
            if cache is not None and end <= window:  # everything so far fits: run the new positions
                hidden = model.rack(model.embedding(seq[cache.length : end][None]), "causal", cache=cache)
            else:
                cache = None  # the window slides from here on: the cached keys no longer apply
                context = seq[max(0, end - window) : end][None]
                hidden = model.rack(model.embedding(context), "causal")
            # Only the last position's logits are needed: skip the head on all the others.
            logits = model.head(hidden[:, -1])
            token, _ = sample(logits)
            seq[end] = token[0]
            end += 1
            if stop_id is not None and int(token[0]) == stop_id:
                break
    return seq[len(prompt_ids) : end].tolist()


# ---- masked (mlm, diffusion) ----------------------------------------------------------------


def unmask_schedule(length: int, steps: int) -> list[int]:
    """How many positions round s = 1..steps commits: ⌊L·s/S⌋ − ⌊L·(s−1)/S⌋ (linear in s; the
    counts sum to L, so nothing is masked after the last round)."""
    return [length * s // steps - length * (s - 1) // steps for s in range(1, steps + 1)]


def generate_masked(
    model: Any,
    prompt_ids: list[int],
    length: int,
    *,
    mask_id: int,
    steps: int = 16,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    banned_ids: Sequence[int] = (),
    strategy: str = "confidence",
) -> list[int]:
    """Fill `length` [MASK] positions after `prompt_ids` in `steps` rounds of bidirectional
    prediction. Each round predicts every masked position and commits `unmask_schedule` many:
    the most confident ones (`strategy="confidence"`) or random ones (`"random"`); the rest are
    re-masked and predicted again next round. Prompt ids never change. Returns the new ids."""
    _check_masked_args(model, prompt_ids, length, steps, strategy)
    # [MASK] is what marks "still to fill": sampling it would leave a hole.
    sample = _Sampler.build(model, temperature, top_k, seed, [*banned_ids, mask_id])
    seq = torch.tensor([*prompt_ids, *[mask_id] * length], dtype=torch.long, device=_device(model))
    masked = torch.zeros_like(seq, dtype=torch.bool)
    masked[len(prompt_ids) :] = True
    with _inference(model):
        for k in unmask_schedule(length, steps):
            if k:  # a round that commits nothing would change nothing: skip its forward pass
                _unmask_round(model, seq, masked, k, strategy, sample)
    return seq[len(prompt_ids) :].tolist()


def _check_masked_args(model: Any, prompt_ids: list[int], length: int, steps: int, strategy: str) -> None:
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    _check_ids(prompt_ids, model.vocab_size, "the prompt")
    limit = model.cfg.max_seq_len
    if len(prompt_ids) + length > limit:
        raise ValueError(
            f"prompt ({len(prompt_ids)} tokens) + length ({length}) exceeds the model's "
            f"max_seq_len={limit}: masked generation sees the whole sequence at once; shorten one of them"
        )


def _unmask_round(
    model: Any,
    seq: torch.Tensor,
    masked: torch.Tensor,
    k: int,
    strategy: str,
    sample: _Sampler,
) -> None:
    """Predict every masked position of `seq`, commit `k` of them (in place)."""
    positions = masked.nonzero().squeeze(-1)
    hidden = model.rack(model.embedding(seq[None]), "bidirectional")
    logits = model.head(hidden[0, positions])
    ids, confidence = sample(logits)
    if strategy == "random":  # same commit count, positions drawn uniformly instead
        confidence = torch.rand(confidence.shape, generator=sample.generator, device=confidence.device)
    chosen = confidence.topk(min(k, positions.numel())).indices
    seq[positions[chosen]] = ids[chosen]
    masked[positions[chosen]] = False


# ---- text in, text out ----------------------------------------------------------------------


def generate_text(
    model: Any,
    tokenizer: Any,
    prompt: str,
    *,
    objective: str,
    max_new_tokens: int = 100,
    steps: int = 16,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
) -> str:
    """Continue `prompt` and return only the new text. clm samples left to right and stops at
    [EOS]; mlm and diffusion unmask `max_new_tokens` positions and keep what precedes the first
    [EOS] (what follows it belongs to another document). [PAD] and [MASK] are never sampled."""
    prompt_ids = tokenizer.encode(prompt)
    banned = [tokenizer.pad_id, tokenizer.mask_id]
    if objective == "clm":
        new = generate_causal(
            model, prompt_ids, max_new_tokens, temperature=temperature, top_k=top_k, seed=seed,
            stop_id=tokenizer.eos_id, banned_ids=banned,
        )
    elif objective in MASKED_OBJECTIVES:
        new = generate_masked(
            model, prompt_ids, max_new_tokens, mask_id=tokenizer.mask_id, steps=steps,
            temperature=temperature, top_k=top_k, seed=seed, banned_ids=banned,
        )
    else:
        raise ValueError(f"unknown objective {objective!r}: expected clm, mlm or diffusion")
    if tokenizer.eos_id in new:
        new = new[: new.index(tokenizer.eos_id)]
    return tokenizer.decode(new, skip_special=True)
