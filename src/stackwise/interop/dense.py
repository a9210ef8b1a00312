"""A StackWiseModel's weights in their dense form, under Hugging Face Llama names.

LoRA adapters are merged into their bases and NF4 bases dequantized (`merge_lora` gives a dense
copy of a stack), every tensor in fp32; blocks in rack order are layers 0..L-1. Export writes this
state, and `model.init_from` a run reads it, so both see the same weights.
"""

from __future__ import annotations

import torch

from stackwise.interop.names import BLOCK_PARTS, OUTER, hf_block_name
from stackwise.model.lora import lora_layers, merge_lora


def dense_blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """Every block of the rack in order, dense (a merged copy where a stack carries LoRA/NF4)."""
    blocks = []
    for stack in model.rack:
        dense = merge_lora(stack) if lora_layers(stack) else stack
        blocks.extend(dense.blocks)
    return blocks


def dense_hf_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """HF name -> fp32 tensor (detached copies). A tied head is left out (its weight is the
    embedding's); callers that need `lm_head.weight` for a tied model take the embedding's."""
    state = {
        OUTER["embedding.tokens.weight"]: model.embedding.tokens.weight,
        OUTER["head.norm.weight"]: model.head.norm.weight,
    }
    if not model.tied:
        state[OUTER["head.proj.weight"]] = model.head.proj.weight
    for layer, block in enumerate(dense_blocks(model)):
        params = dict(block.named_parameters())
        for part in BLOCK_PARTS:
            if part in params:
                state[hf_block_name(layer, part)] = params[part]
    return {name: t.detach().to(torch.float32).clone() for name, t in state.items()}
