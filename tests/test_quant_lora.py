"""NF4 storage (stackwise.model.quant) and LoRA adapters (stackwise.model.lora)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from stackwise.config import StackWiseConfig
from stackwise.model import quant
from stackwise.model.layers import Block, Rotary, attention_class
from stackwise.model.lora import (
    LoRALinear,
    attach_lora,
    count_lora_params,
    flat_state,
    load_flat_state,
    lora_layers,
    lora_parameters,
    merge_lora,
    merge_lora_,
    storage_bytes,
)
from stackwise.model.rack import Stack

pytestmark = pytest.mark.skipif(not quant.nf4_available(), reason="torchao is not installed")

ALL_TARGETS = ["q", "k", "v", "o", "gate", "up", "down", "q_down", "q_up", "kv_down", "k_up", "v_up", "k_rope"]
KINDS = {
    "mha": {},
    "mla": {"attention": "mla", "mla": {"kv_rank": 16, "q_rank": 32}},
}


def model_config(**model):
    base = {"vocab_size": 300, "d_model": 64, "n_heads": 4, "architecture": {"n_stacks": 1, "blocks_per_stack": 1}}
    return StackWiseConfig.from_dict({"model": {**base, **model}, "training": {}, "data": {}}).model


def rope_for(cfg, seq_len: int = 6):
    return Rotary(attention_class(cfg).rope_dim(cfg), 16)(seq_len, torch.device("cpu"))


def randomize_adapters(module: nn.Module) -> None:
    """B starts at zero; give it values so merges and round trips test something."""
    with torch.no_grad():
        for p in lora_parameters(module):
            p.normal_(0, 0.05)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


# ---------------------------------------------------------------------------------------------- quant


@pytest.mark.parametrize("shape", [(688, 256), (256, 688), (256, 256)])
def test_to_nf4_handles_ffn_shapes_and_is_accurate(shape):
    torch.manual_seed(0)
    w = torch.randn(shape) * 0.02
    t = quant.to_nf4(w)
    assert quant.is_nf4(t) and t.shape == w.shape and not quant.is_nf4(w)
    assert rel_err(quant.dequantize(t), w) < 0.12
    assert quant.dequantize(t, torch.bfloat16).dtype == torch.bfloat16
    assert quant.nf4_nbytes(t) < w.numel() * 4 * 0.14  # ≈ 4.13 bits per weight


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(688, 256), (64, 3)])
def test_decode_is_bit_identical_to_torchaos_decoder(shape, dtype):
    torch.manual_seed(0)
    t = quant.to_nf4(torch.randn(shape, dtype=dtype))
    reference = t.get_original_weight()  # torchao's own decoder
    decoded = quant.decode_nf4(t, dtype)
    assert decoded.dtype == dtype and torch.equal(decoded, reference)
    assert torch.equal(quant.decode_nf4(t, torch.float32), reference.float())


def test_nf4_linear_gradients_are_those_of_the_decoded_weight():
    torch.manual_seed(0)
    t = quant.to_nf4(torch.randn(688, 256) * 0.02)
    x = torch.randn(3, 5, 256, requires_grad=True)
    y = quant.nf4_linear(x, t)
    grad_out = torch.randn_like(y)
    (grad,) = torch.autograd.grad(y, x, grad_out)
    dense = x.detach().clone().requires_grad_()
    expected = F.linear(dense, t.get_original_weight())
    expected.backward(grad_out)
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    torch.testing.assert_close(grad, dense.grad, rtol=1e-6, atol=1e-6)


def test_nf4_linear_under_autocast_matches_autocast_linear():
    torch.manual_seed(0)
    t = quant.to_nf4(torch.randn(688, 256) * 0.02)
    x = torch.randn(4, 256)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours = quant.nf4_linear(x, t)
        expected = F.linear(x, t.get_original_weight())
    assert ours.dtype == torch.bfloat16 and torch.equal(ours, expected)


def test_scaler_block_size_rule_and_clear_error():
    assert quant.scaler_block_size_for(2752) == 172  # 688×256 / 64 blocks; 256 does not divide it
    assert quant.scaler_block_size_for(1024) == 256
    assert quant.scaler_block_size_for(67) == 67
    with pytest.raises(ValueError, match=r"\(10, 10\)"):
        quant.to_nf4(torch.randn(10, 10))


def test_nf4_tensors_round_trip_through_safetensors_bit_exactly(tmp_path):
    torch.manual_seed(0)
    t = quant.to_nf4(torch.randn(688, 256))
    tensors = quant.nf4_to_tensors("w", t)
    assert all(k.startswith("w.__nf4__.") for k in tensors)
    save_file(tensors, tmp_path / "w.safetensors")
    back = quant.nf4_from_tensors("w", load_file(tmp_path / "w.safetensors"))
    assert quant.is_nf4(back) and back.shape == t.shape and back.dtype == t.dtype
    assert torch.equal(quant.dequantize(back), quant.dequantize(t))
    assert torch.equal(quant.dequantize(quant.nf4_clone(t)), quant.dequantize(t))


# ---------------------------------------------------------------------------------------------- layer


def test_lora_linear_matches_its_base_at_attach():
    torch.manual_seed(0)
    base = nn.Linear(256, 688, bias=False)
    x = torch.randn(2, 5, 256)
    dense = LoRALinear.from_linear(base, rank=4, alpha=8)
    assert torch.equal(dense(x), base(x))
    assert dense.weight.shape == (688, 256) and (dense.in_features, dense.out_features) == (256, 688)
    nf4 = LoRALinear.from_linear(base, rank=4, alpha=8, base_precision="nf4")
    assert nf4.base_precision == "nf4" and quant.is_nf4(nf4.weight)
    expected = F.linear(x, quant.dequantize(nf4.weight))
    torch.testing.assert_close(nf4(x), expected, rtol=1e-5, atol=1e-6)
    bf16 = LoRALinear.from_linear(base, rank=4, alpha=8, base_precision="bf16")
    assert bf16.weight.dtype == torch.bfloat16 and bf16(x).dtype == torch.float32


@pytest.mark.parametrize("precision", ["fp32", "nf4"])
def test_training_moves_only_the_adapters(precision):
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(64, 128, bias=False), rank=4, alpha=8, dropout=0.1, base_precision=precision)
    base_before = quant.dequantize(layer.weight).clone()
    a_before, b_before = layer.lora_A.detach().clone(), layer.lora_B.detach().clone()
    opt = torch.optim.AdamW(lora_parameters(layer), lr=1e-2)
    x = torch.randn(8, 64, requires_grad=True)
    target = torch.randn(8, 128)
    for _ in range(3):
        opt.zero_grad()
        F.mse_loss(layer(x), target).backward()
        opt.step()
    assert x.grad is not None and layer.weight.grad is None and not layer.weight.requires_grad
    assert quant.is_nf4(layer.weight) == (precision == "nf4")
    assert torch.equal(quant.dequantize(layer.weight), base_before)
    assert not torch.equal(layer.lora_A, a_before) and not torch.equal(layer.lora_B, b_before)


# ---------------------------------------------------------------------------------------------- stacks


def test_nf4_stack_storage_is_under_30_percent_of_fp32():
    torch.manual_seed(0)
    cfg = model_config(d_model=256, n_heads=8, ffn_hidden=688)
    stack = Stack(cfg, n_blocks=1)
    fp32_bytes = storage_bytes(stack)
    adapted = attach_lora(stack, ["q", "v"], rank=8, alpha=16, base_precision="nf4")
    assert adapted == ["blocks.0.attention.q", "blocks.0.attention.v"]
    assert all(quant.is_nf4(m.weight) for m in stack.modules() if isinstance(m, LoRALinear))
    assert storage_bytes(stack) <= 0.30 * fp32_bytes
    assert stack.blocks[0].attn_norm.weight.dtype == torch.float32


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("precision", ["fp32", "nf4"])
def test_attach_lora_on_blocks(kind, precision):
    torch.manual_seed(0)
    cfg = model_config(**KINDS[kind])
    block = Block(cfg).eval()
    rope = rope_for(cfg)
    x = torch.randn(2, 6, 64)
    before = block(x, rope)
    linears = {p for p, m in block.named_modules() if isinstance(m, nn.Linear)}
    adapted = attach_lora(block, ALL_TARGETS, rank=4, alpha=8, base_precision=precision)
    assert set(adapted) == linears  # every Linear named in targets, mha or mla
    assert not any(isinstance(m, nn.Linear) for m in block.modules())
    assert {n for n, p in block.named_parameters() if p.requires_grad} == {
        f"{path}.{ab}" for path in adapted for ab in ("lora_A", "lora_B")
    }
    assert count_lora_params(block) == sum(p.numel() for p in lora_parameters(block))
    after = block(x, rope)
    if precision == "fp32":
        assert torch.equal(after, before)
    else:
        assert rel_err(after - x, before - x) < 0.2  # the block's contribution, off by NF4 error only


@pytest.mark.parametrize("precision", ["fp32", "nf4"])
def test_merge_lora_gives_a_dense_copy_with_the_same_outputs(precision):
    torch.manual_seed(0)
    cfg = model_config(**KINDS["mla"])
    block = Block(cfg).eval()
    attach_lora(block, ["q_up", "k_up", "o", "up"], rank=4, alpha=8, base_precision=precision)
    randomize_adapters(block)
    rope = rope_for(cfg)
    x = torch.randn(2, 6, 64)
    merged = merge_lora(block)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert all(not quant.is_nf4(p) and p.dtype == torch.float32 for p in merged.parameters())
    assert sum(isinstance(m, LoRALinear) for m in block.modules()) == 10  # original keeps them
    torch.testing.assert_close(merged(x, rope), block(x, rope), rtol=1e-5, atol=1e-5)
    expected = block(x, rope)
    assert merge_lora_(block) is block and not lora_layers(block)  # the in-place variant
    assert torch.equal(block(x, rope), merged(x, rope))
    torch.testing.assert_close(block(x, rope), expected, rtol=1e-5, atol=1e-5)


def test_flat_state_round_trips_through_safetensors_bit_exactly(tmp_path):
    torch.manual_seed(0)
    cfg = model_config(ffn_hidden=176)
    settings = {"targets": ["q", "v", "down"], "rank": 4, "alpha": 8}
    stack = Stack(cfg, n_blocks=1).eval()
    attach_lora(stack.blocks[0].attention, **settings, base_precision="nf4")
    attach_lora(stack.blocks[0].mlp, **settings, base_precision="fp32")
    randomize_adapters(stack)
    save_file(flat_state(stack), tmp_path / "stack.safetensors")

    torch.manual_seed(1)  # a different base and different adapters: everything must come from the file
    fresh = Stack(cfg, n_blocks=1).eval()
    attach_lora(fresh.blocks[0].attention, **settings, base_precision="nf4")
    attach_lora(fresh.blocks[0].mlp, **settings, base_precision="fp32")
    load_flat_state(fresh, load_file(tmp_path / "stack.safetensors"))
    rope = rope_for(cfg)
    x = torch.randn(2, 6, 64)
    assert torch.equal(fresh(x, rope), stack(x, rope))
    assert quant.is_nf4(fresh.blocks[0].attention.q.weight)


def test_deepcopy_keeps_nf4_bases_exact():
    # torchao's own NF4 clone requantizes with default block sizes (and fails for 688×256).
    torch.manual_seed(0)
    layer = LoRALinear.from_linear(nn.Linear(256, 688, bias=False), rank=4, alpha=8, base_precision="nf4")
    randomize_adapters(layer)
    twin = copy.deepcopy(layer)
    assert quant.is_nf4(twin.weight) and twin.weight is not layer.weight
    x = torch.randn(3, 256)
    assert torch.equal(twin(x), layer(x))


def test_load_flat_state_is_strict():
    torch.manual_seed(0)
    cfg = model_config()
    block = Block(cfg)
    attach_lora(block, ["q"], rank=4, alpha=8, base_precision="nf4")
    tensors = flat_state(block)
    dense_block = Block(cfg)
    attach_lora(dense_block, ["q"], rank=4, alpha=8)
    with pytest.raises(ValueError, match="stores it dense"):
        load_flat_state(dense_block, tensors)
    other_rank = Block(cfg)
    attach_lora(other_rank, ["q"], rank=2, alpha=8, base_precision="nf4")
    with pytest.raises(ValueError, match="lora_A"):
        load_flat_state(other_rank, tensors)
    with pytest.raises(KeyError, match="missing"):
        load_flat_state(block, {k: v for k, v in tensors.items() if "lora_B" not in k})


def test_attach_lora_rejects_typos_and_double_attach():
    cfg = model_config()
    block = Block(cfg)
    with pytest.raises(ValueError, match="match no Linear"):
        attach_lora(block, ["qq"], rank=4, alpha=8)
    assert all(p.requires_grad for p in block.parameters())  # a refused attach changes nothing
    attach_lora(block, ["q"], rank=4, alpha=8)
    with pytest.raises(ValueError, match="already carries"):
        attach_lora(block, ["q"], rank=4, alpha=8)
