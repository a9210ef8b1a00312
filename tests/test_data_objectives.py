"""The corruption functions: clm shift, MLM statistics, masked diffusion, per-sample determinism."""

from __future__ import annotations

import pytest
import torch

from stackwise.data import ATTENTION_MODE, clm, diffusion, mlm, stable_seed

MASK = 257
REGULAR = torch.arange(256)


def _tokens(batch: int, length: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_clm_shifts_by_one_and_keeps_every_position():
    windows = torch.arange(20).reshape(2, 10)
    c = clm(windows)
    assert torch.equal(c.input_ids, windows[:, :-1]) and torch.equal(c.labels, windows[:, 1:])
    assert c.loss_mask.all() and torch.equal(c.loss_weight, torch.ones(2, 9))
    assert ATTENTION_MODE == {"clm": "causal", "mlm": "bidirectional", "diffusion": "bidirectional"}


def test_mlm_statistics_over_many_tokens():
    tokens = _tokens(100, 512)  # 51,200 tokens
    rate = 0.15
    c = mlm(tokens, range(100), rate=rate, mask_id=MASK, regular_ids=REGULAR, seed=3, phase=0)
    assert torch.equal(c.labels, tokens)
    selected = c.loss_mask
    assert abs(selected.float().mean().item() - rate) < 0.01
    n = selected.sum().item()
    masked = (c.input_ids == MASK) & selected
    kept = (c.input_ids == tokens) & selected
    replaced = selected & ~masked & ~kept
    assert abs(masked.sum().item() / n - 0.8) < 0.02
    assert abs(replaced.sum().item() / n - 0.1) < 0.02
    assert abs(kept.sum().item() / n - 0.1) < 0.02
    assert torch.equal(c.input_ids[~selected], tokens[~selected])  # unselected positions are untouched
    assert (c.input_ids < 256).logical_or(c.input_ids == MASK).all()  # random replacements are never special
    assert torch.equal(c.loss_weight, selected.float())


def test_mlm_random_tokens_come_from_regular_ids_only():
    tokens = torch.zeros(50, 400, dtype=torch.long)
    allowed = torch.tensor([5, 9])
    c = mlm(tokens, range(50), rate=0.5, mask_id=MASK, regular_ids=allowed, seed=0, phase=0)
    assert set(c.input_ids.unique().tolist()) == {0, 5, 9, MASK}


def test_diffusion_masks_everything_selected_with_weight_one_over_r():
    tokens = _tokens(64, 128)
    lo, hi = 0.1, 0.9
    c = diffusion(tokens, range(64), mask_range=(lo, hi), mask_id=MASK, seed=1, phase=2)
    assert c.mask_rates is not None and ((c.mask_rates >= lo) & (c.mask_rates <= hi)).all()
    assert c.mask_rates.std() > 0.1  # one rate per sample, not one per batch
    assert torch.equal(c.input_ids == MASK, c.loss_mask)  # every selected token is [MASK], nothing else is
    assert torch.equal(c.input_ids[~c.loss_mask], tokens[~c.loss_mask])
    assert torch.equal(c.labels, tokens)
    for b in range(64):
        w = c.loss_weight[b]
        assert torch.allclose(w[c.loss_mask[b]], 1.0 / c.mask_rates[b], rtol=1e-6)
        assert (w[~c.loss_mask[b]] == 0).all()
    observed = c.loss_mask.float().mean(1)
    assert (observed - c.mask_rates).abs().mean() < 0.05  # the masked fraction follows each sample's r


def test_every_sample_gets_at_least_one_target():
    tokens = _tokens(200, 4)
    d = diffusion(tokens, range(200), mask_range=(0.01, 0.01), mask_id=MASK, seed=0, phase=0)
    m = mlm(tokens, range(200), rate=0.01, mask_id=MASK, regular_ids=REGULAR, seed=0, phase=0)
    assert (d.loss_mask.sum(1) >= 1).all() and (m.loss_mask.sum(1) >= 1).all()


def test_corruption_is_a_function_of_seed_sample_phase_and_rate():
    tokens = _tokens(4, 64)
    kw = {"mask_id": MASK, "seed": 7, "phase": 1}
    a = diffusion(tokens, [10, 11, 12, 13], mask_range=(0.2, 0.8), **kw)
    b = diffusion(tokens, [10, 11, 12, 13], mask_range=(0.2, 0.8), **kw)
    assert torch.equal(a.input_ids, b.input_ids) and torch.equal(a.loss_weight, b.loss_weight)
    # The same sample alone, or at another position of the batch, is corrupted the same way.
    alone = diffusion(tokens[2:3], [12], mask_range=(0.2, 0.8), **kw)
    assert torch.equal(alone.input_ids[0], a.input_ids[2])
    other_phase = diffusion(tokens, [10, 11, 12, 13], mask_range=(0.2, 0.8), mask_id=MASK, seed=7, phase=2)
    other_seed = diffusion(tokens, [10, 11, 12, 13], mask_range=(0.2, 0.8), mask_id=MASK, seed=8, phase=1)
    assert not torch.equal(other_phase.loss_mask, a.loss_mask) and not torch.equal(
        other_seed.loss_mask, a.loss_mask
    )
    m1 = mlm(tokens, range(4), rate=0.3, regular_ids=REGULAR, **kw)
    m2 = mlm(tokens, range(4), rate=0.3, regular_ids=REGULAR, **kw)
    m3 = mlm(tokens, range(4), rate=0.31, regular_ids=REGULAR, **kw)
    assert torch.equal(m1.input_ids, m2.input_ids) and not torch.equal(m1.loss_mask, m3.loss_mask)


def test_stable_seed_is_fixed_across_processes():
    # A literal value: if this changes, every cached activation and resumed run would see new masks.
    assert stable_seed(0, 0, 0, "mlm", 0.15) == stable_seed(0, 0, 0, "mlm", 0.15)
    assert stable_seed(0, 0, 1, "mlm", 0.15) != stable_seed(0, 0, 0, "mlm", 0.15)
    assert stable_seed("a", 1) == 5683893143056039273


def test_bad_rates_are_rejected():
    with pytest.raises(ValueError, match="mask rate"):
        mlm(_tokens(1, 8), [0], rate=0.0, mask_id=MASK, regular_ids=REGULAR, seed=0, phase=0)
    with pytest.raises(ValueError, match="mask_range"):
        diffusion(_tokens(1, 8), [0], mask_range=(0.5, 0.2), mask_id=MASK, seed=0, phase=0)
