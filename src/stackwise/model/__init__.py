"""The model plane: Block, Stack, Rack, Embedding, Head and StackWiseModel."""

from stackwise.model.kv_cache import KVCache
from stackwise.model.layers import Attention, Block, LatentAttention, RMSNorm, SwiGLU, block_param_count
from stackwise.model.rack import Embedding, Head, Rack, Stack, StackWiseModel

__all__ = [
    "Attention",
    "Block",
    "Embedding",
    "Head",
    "KVCache",
    "LatentAttention",
    "RMSNorm",
    "Rack",
    "Stack",
    "StackWiseModel",
    "SwiGLU",
    "block_param_count",
]
