"""ProgressiveDataLoader: (seed, step) purity, epochs, objectives, validation, dummy data, metrics."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stackwise.config import Ramp
from stackwise.data import Batch
from stackwise.training import ProgressiveDataLoader
from stackwise.training.metrics import bits_per_byte, token_loss


def _config(tmp_path, **data) -> dict:
    return {
        "model": {},
        "training": {"batch_size": 4, "seq_len": 64, "seed": 11},
        "data": {"cache_dir": str(tmp_path / "cache"), "tokenizer": "byte", **data},
    }


@pytest.fixture
def loader(tmp_path) -> ProgressiveDataLoader:
    return ProgressiveDataLoader(_config(tmp_path))


def _same(a: Batch, b: Batch) -> bool:
    return all(
        torch.equal(getattr(a, f), getattr(b, f))
        for f in ("input_ids", "labels", "loss_mask", "loss_weight", "sample_ids")
    ) and (a.n_target_bytes, a.n_target_tokens) == (b.n_target_bytes, b.n_target_tokens)


@pytest.mark.parametrize("objective", ["clm", "mlm", "diffusion"])
def test_batches_are_a_pure_function_of_seed_and_step(tmp_path, loader, objective):
    loader.configure(objective=objective)
    first = loader.batch_at(5)
    loader.batch_at(6)
    assert _same(loader.batch_at(5), first)
    assert not _same(loader.batch_at(6), first)
    fresh = ProgressiveDataLoader(_config(tmp_path))
    fresh.configure(objective=objective)
    assert _same(fresh.batch_at(5), first)
    other_seed = _config(tmp_path)
    other_seed["training"]["seed"] = 12
    reseeded = ProgressiveDataLoader(other_seed)
    reseeded.configure(objective=objective)
    assert not torch.equal(reseeded.batch_at(5).sample_ids, first.sample_ids)


def test_iteration_equals_batch_at(loader):
    it = iter(loader)
    for step in range(3):
        assert _same(next(it), loader.batch_at(step))


def test_an_epoch_visits_every_window_once_and_epochs_are_reshuffled(loader):
    loader.configure(seq_len=255, batch_size=7)  # odd sizes: batches straddle epoch boundaries
    n = loader.n_train_windows
    steps = math.ceil(2 * n / 7)
    ids = torch.cat([loader.batch_at(s).sample_ids for s in range(steps)]).tolist()
    epoch0, epoch1 = ids[:n], ids[n : 2 * n]
    assert sorted(epoch0) == list(range(n)) and sorted(epoch1) == list(range(n))
    assert epoch0 != epoch1


def test_windows_are_non_overlapping_slices_of_the_token_stream(loader):
    b = loader.batch_at(0)
    tokens = np.asarray(loader._tokens.train)
    for row, w in enumerate(b.sample_ids.tolist()):
        window = tokens[w * 65 : (w + 1) * 65]
        assert b.input_ids[row].tolist() == window[:-1].tolist()
        assert b.labels[row].tolist() == window[1:].tolist()


def test_phase_start_step_and_phase_index(loader):
    loader.configure(phase_index=2)
    assert _same(loader.batch_at(100, phase_start_step=100), loader.batch_at(0))
    later_phase = loader.batch_at(0)
    loader.configure(phase_index=3)
    assert not torch.equal(loader.batch_at(0).sample_ids, later_phase.sample_ids)
    with pytest.raises(ValueError, match="before the phase start"):
        loader.batch_at(5, phase_start_step=10)


@pytest.mark.parametrize(
    ("objective", "mode"), [("clm", "causal"), ("mlm", "bidirectional"), ("diffusion", "bidirectional")]
)
def test_attention_mode_and_shapes_per_objective(loader, objective, mode):
    loader.configure(objective=objective, seq_len=32, batch_size=3)
    b = loader.batch_at(0)
    assert b.objective == objective and b.attention_mode == mode
    assert b.input_ids.shape == b.labels.shape == b.loss_mask.shape == b.loss_weight.shape == (3, 32)
    assert (
        b.input_ids.dtype == torch.long
        and b.loss_mask.dtype == torch.bool
        and b.loss_weight.dtype == torch.float32
    )
    assert b.n_tokens == 96 and b.sample_ids.shape == (3,)
    assert torch.equal(b.loss_weight > 0, b.loss_mask)


def test_target_bytes_and_tokens(loader):
    # Byte tokenizer: a target token is one byte unless it is [EOS] (0 bytes).
    b = loader.batch_at(0)
    assert b.n_target_tokens == b.loss_mask.sum().item() == 4 * 64
    assert b.n_target_bytes == int((b.labels < 256).sum())
    loader.configure(objective="mlm")
    b = loader.batch_at(0)
    assert b.n_target_tokens == b.loss_mask.sum().item()
    assert b.n_target_bytes == int((b.labels[b.loss_mask] < 256).sum())
    loader.configure(objective="diffusion")
    b = loader.batch_at(0)
    assert b.n_target_tokens == 4 * 64  # the ELBO covers the whole window
    assert b.n_target_bytes == int((b.labels < 256).sum())


def test_mlm_rate_ramp_follows_tau(loader):
    loader.configure(objective="mlm", mask_rate=Ramp(start=0.1, end=0.5), batch_size=16, seq_len=256)
    early, late = loader.batch_at(0, tau=0.0), loader.batch_at(0, tau=1.0)
    assert abs(early.loss_mask.float().mean().item() - 0.1) < 0.03
    assert abs(late.loss_mask.float().mean().item() - 0.5) < 0.03
    assert torch.equal(early.sample_ids, late.sample_ids)


def test_defaults_come_from_the_config(tmp_path):
    config = _config(tmp_path, objective="diffusion", mask_range=[0.3, 0.4])
    loader = ProgressiveDataLoader(config)
    s = loader.settings
    assert (s.seq_len, s.batch_size, s.objective, s.mask_range) == (64, 4, "diffusion", (0.3, 0.4))
    rates = loader.batch_at(0).mask_rates
    assert ((rates >= 0.3) & (rates <= 0.4)).all()
    loader.configure(objective="clm")
    assert loader.configure().objective == "diffusion"  # each configure starts from the base config


def test_phase_can_switch_corpus(tmp_path):
    other = tmp_path / "other.txt"
    other.write_text("zzzz " * 400)
    loader = ProgressiveDataLoader(_config(tmp_path))
    loader.configure(paths=[str(other)], seq_len=16)
    assert set(loader.batch_at(0).input_ids.unique().tolist()) <= {ord("z"), ord(" "), 258}


def test_validation_is_fixed_sequential_and_independent_of_seed(tmp_path, loader):
    loader.configure(objective="mlm")
    batches = list(loader.validation_batches())
    n = loader.n_val_windows
    assert torch.cat([b.sample_ids for b in batches]).tolist() == list(range(n))
    assert sum(b.input_ids.shape[0] for b in batches) == n
    assert len(list(loader.validation_batches(max_batches=2))) == 2
    config = _config(tmp_path)
    config["training"]["seed"] = 999
    other = ProgressiveDataLoader(config)
    other.configure(objective="mlm", phase_index=4)
    assert all(_same(a, b) for a, b in zip(batches, other.validation_batches(), strict=True))


def test_dummy_data_is_deterministic_learnable_and_sized_by_model_vocab(tmp_path):
    config = {
        "model": {"vocab_size": 1000},
        "training": {"batch_size": 4, "seq_len": 32},
        "data": {"use_dummy_data": True},
    }
    a, b = ProgressiveDataLoader(config), ProgressiveDataLoader(config)
    assert a.vocab_size == 1000 and a.tokenizer.kind == "dummy"
    assert _same(a.batch_at(3), b.batch_at(3))
    ids = a.batch_at(3).input_ids
    assert ids.max() < 997  # the last three ids are the specials
    # Words repeat: many more bigrams repeat than uniform random tokens would allow.
    stream = np.asarray(a._tokens.train[:20000], dtype=np.int64)
    bigrams = stream[:-1] * 1000 + stream[1:]
    assert len(np.unique(bigrams)) < 0.5 * len(bigrams)
    default = ProgressiveDataLoader(
        {"model": {}, "training": {"seq_len": 32}, "data": {"use_dummy_data": True}}
    )
    assert default.vocab_size == 512
    a.configure(objective="diffusion")
    assert (a.batch_at(0).input_ids == a.tokenizer.mask_id).any()


def test_batch_to_device(loader):
    b = loader.batch_at(0).to("cpu")
    assert b.input_ids.device.type == "cpu" and isinstance(b, Batch)


def test_batch_spec(loader):
    pytest.importorskip("stackwise.framework")
    loader.configure(objective="mlm", mask_rate=0.2, seq_len=32, batch_size=3)
    spec = loader.get_batch_spec()
    assert (spec.batch_size, spec.seq_len, spec.vocab_size) == (3, 32, 259)
    assert (spec.objective, spec.attention_mode, spec.mask_rate) == ("mlm", "bidirectional", 0.2)


def test_bits_per_byte_formula():
    assert bits_per_byte(math.log(2) * 1000, 1000) == pytest.approx(1.0)
    assert bits_per_byte(693.147, 250) == pytest.approx(4.0, rel=1e-5)
    with pytest.raises(ValueError):
        bits_per_byte(1.0, 0)


def test_token_loss_honors_mask_and_weights(loader):
    loader.configure(objective="diffusion", seq_len=16, batch_size=2)
    b = loader.batch_at(0)
    torch.manual_seed(0)
    logits = torch.randn(2, 16, 259)
    ce = torch.nn.functional.cross_entropy(
        logits.reshape(-1, 259), b.labels.reshape(-1), reduction="none"
    ).reshape(2, 16)
    expected_sum = (ce * b.loss_weight).sum()
    assert torch.allclose(token_loss(logits, b, reduction="sum"), expected_sum)
    assert torch.allclose(token_loss(logits, b), expected_sum / 32)
    loader.configure(objective="clm", seq_len=16, batch_size=2)
    b = loader.batch_at(0)
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, 259), b.labels.reshape(-1))
    assert torch.allclose(token_loss(logits, b), ce)
    uniform = torch.zeros(2, 16, 259)
    total = token_loss(uniform, b, reduction="sum").item()
    assert bits_per_byte(total, b.n_target_bytes) == pytest.approx(math.log2(259) * 32 / b.n_target_bytes)
