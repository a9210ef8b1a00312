"""Parameter names: stackwise's dense layout ↔ Hugging Face's Llama layout (docs/interop.md).

A rack's blocks, read in rack order (stack after stack, block after block), are HF's layers
0..L-1. Within a block the parts map one to one; RoPE uses the same half-split channel pairing
(HF's `rotate_half`), so q/k weights need no permutation.
"""

from __future__ import annotations

# our name inside a block -> HF's name inside `model.layers.{i}`
BLOCK_PARTS: dict[str, str] = {
    "attn_norm.weight": "input_layernorm.weight",
    "attention.q.weight": "self_attn.q_proj.weight",
    "attention.k.weight": "self_attn.k_proj.weight",
    "attention.v.weight": "self_attn.v_proj.weight",
    "attention.o.weight": "self_attn.o_proj.weight",
    "attention.q.bias": "self_attn.q_proj.bias",
    "attention.k.bias": "self_attn.k_proj.bias",
    "attention.v.bias": "self_attn.v_proj.bias",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate.weight": "mlp.gate_proj.weight",
    "mlp.up.weight": "mlp.up_proj.weight",
    "mlp.down.weight": "mlp.down_proj.weight",
}

# outside the rack: ours -> HF's
OUTER: dict[str, str] = {
    "embedding.tokens.weight": "model.embed_tokens.weight",
    "head.norm.weight": "model.norm.weight",
    "head.proj.weight": "lm_head.weight",
}

HF_LAYER_PREFIX = "model.layers."


def hf_block_name(layer: int, part: str) -> str:
    """HF's name of `part` (one of BLOCK_PARTS' keys) in global layer `layer`."""
    return f"{HF_LAYER_PREFIX}{layer}.{BLOCK_PARTS[part]}"


def our_block_parts() -> dict[str, str]:
    """HF's name inside a layer -> ours inside a block."""
    return {hf: ours for ours, hf in BLOCK_PARTS.items()}
