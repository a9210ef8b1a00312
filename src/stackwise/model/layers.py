"""One transformer block and its parts: RMSNorm, RoPE, attention (mha, gqa, mla) and SwiGLU.

Attention mode (`causal` or `bidirectional`) is an argument of every forward call, never a
property of the weights, so one set of weights serves CLM and masked objectives.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from stackwise.config import ModelConfig
from stackwise.model.kv_cache import KVCache

ATTENTION_MODES = ("causal", "bidirectional")


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 whatever the compute dtype: bf16 variance underflows.
        normed = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.type_as(x) * self.weight


class Rotary(nn.Module):
    """RoPE tables (cos, sin) for `dim` rotary channels, cached up to the longest length seen."""

    def __init__(self, dim: int, max_seq_len: int, theta: float = 10000.0):
        super().__init__()
        self.dim, self.max_seq_len, self.theta = dim, max_seq_len, theta
        self.register_buffer("cos", torch.empty(0), persistent=False)
        self.register_buffer("sin", torch.empty(0), persistent=False)

    def forward(self, seq_len: int, device: torch.device, offset: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Tables of positions [offset, offset + seq_len)."""
        if offset + seq_len > self.max_seq_len:
            raise ValueError(f"sequence length {offset + seq_len} exceeds model.max_seq_len={self.max_seq_len}")
        if self.cos.shape[0] < offset + seq_len or self.cos.device != device:
            inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.dim, 2, device=device, dtype=torch.float32) / self.dim))
            angles = torch.outer(torch.arange(self.max_seq_len, device=device, dtype=torch.float32), inv_freq)
            self.cos, self.sin = angles.cos(), angles.sin()
        return self.cos[offset : offset + seq_len], self.sin[offset : offset + seq_len]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x[..., :d/2], x[..., d/2:]) of x (B, H, T, d) by position angles."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    rotated = torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)
    return rotated.type_as(x)


def _sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mode: str, dropout: float) -> torch.Tensor:
    if mode not in ATTENTION_MODES:
        raise ValueError(f"attention_mode must be one of {ATTENTION_MODES}, got {mode!r}")
    queries, keys = q.shape[-2], k.shape[-2]
    if mode == "causal" and queries == 1:  # the newest position sees every cached one: no mask
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout)
    if mode == "causal" and queries != keys:
        # Queries are the last positions of a longer cached sequence: query i sees keys ≤ its position.
        mask = torch.ones(queries, keys, dtype=torch.bool, device=q.device).tril(keys - queries)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout)
    return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=mode == "causal")


class Attention(nn.Module):
    """Multi-head attention; grouped-query (GQA) when n_kv_heads < n_heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.dropout = cfg.dropout
        bias = cfg.qkv_bias  # Qwen2-style checkpoints carry q/k/v biases
        self.q = nn.Linear(cfg.d_model, self.n_heads * self.head_dim, bias=bias)
        self.k = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=bias)
        self.v = nn.Linear(cfg.d_model, self.n_kv_heads * self.head_dim, bias=bias)
        self.o = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)

    @staticmethod
    def rope_dim(cfg: ModelConfig) -> int:
        return cfg.head_dim

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mode: str, cache: KVCache | None = None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.append(self, k, v)
        if self.n_kv_heads != self.n_heads:
            # Each K/V head serves n_heads / n_kv_heads query heads.
            repeat = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(repeat, dim=1), v.repeat_interleave(repeat, dim=1)
        out = _sdpa(q, k, v, mode, self.dropout if self.training else 0.0)
        return self.o(out.transpose(1, 2).reshape(B, T, -1))


class LatentAttention(nn.Module):
    """Multi-head latent attention (DeepSeek-V2): K and V are expanded from one low-rank latent
    c = RMSNorm(kv_down(x)); position enters through a decoupled RoPE key shared by all heads."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim, self.dropout = cfg.n_heads, cfg.head_dim, cfg.dropout
        self.kv_rank = cfg.mla.kv_rank or max(1, cfg.d_model // 4)
        self.rope_dim_ = self.rope_dim(cfg)
        q_out = self.n_heads * (self.head_dim + self.rope_dim_)
        if cfg.mla.q_rank:
            self.q_down = nn.Linear(cfg.d_model, cfg.mla.q_rank, bias=False)
            self.q_norm = RMSNorm(cfg.mla.q_rank, cfg.norm_eps)
            self.q_up = nn.Linear(cfg.mla.q_rank, q_out, bias=False)
        else:
            self.q = nn.Linear(cfg.d_model, q_out, bias=False)
        self.kv_down = nn.Linear(cfg.d_model, self.kv_rank, bias=False)
        self.kv_norm = RMSNorm(self.kv_rank, cfg.norm_eps)
        self.k_up = nn.Linear(self.kv_rank, self.n_heads * self.head_dim, bias=False)
        self.v_up = nn.Linear(self.kv_rank, self.n_heads * self.head_dim, bias=False)
        self.k_rope = nn.Linear(cfg.d_model, self.rope_dim_, bias=False)
        self.o = nn.Linear(self.n_heads * self.head_dim, cfg.d_model, bias=False)

    @staticmethod
    def rope_dim(cfg: ModelConfig) -> int:
        return cfg.mla.rope_dim or max(2, cfg.head_dim // 2)

    def forward(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], mode: str, cache: KVCache | None = None
    ) -> torch.Tensor:
        B, T, _ = x.shape
        H, hd, rd = self.n_heads, self.head_dim, self.rope_dim_
        q = self.q_up(self.q_norm(self.q_down(x))) if hasattr(self, "q_up") else self.q(x)
        q = q.view(B, T, H, hd + rd).transpose(1, 2)
        q_nope, q_pos = q.split([hd, rd], dim=-1)
        latent = self.kv_norm(self.kv_down(x))
        k_nope = self.k_up(latent).view(B, T, H, hd).transpose(1, 2)
        v = self.v_up(latent).view(B, T, H, hd).transpose(1, 2)
        k_pos = apply_rope(self.k_rope(x).view(B, 1, T, rd), *rope).expand(B, H, T, rd)
        q = torch.cat((q_nope, apply_rope(q_pos, *rope)), dim=-1)
        k = torch.cat((k_nope, k_pos), dim=-1)
        if cache is not None:
            k, v = cache.append(self, k, v)
        out = _sdpa(q, k, v, mode, self.dropout if self.training else 0.0)
        return self.o(out.transpose(1, 2).reshape(B, T, -1))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.gate = nn.Linear(d_model, hidden, bias=False)
        self.up = nn.Linear(d_model, hidden, bias=False)
        self.down = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


def attention_class(cfg: ModelConfig) -> type[Attention] | type[LatentAttention]:
    return LatentAttention if cfg.attention == "mla" else Attention


class Block(nn.Module):
    """Pre-norm transformer layer: x + Attn(RMSNorm(x)), then h + SwiGLU(RMSNorm(h))."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attention = attention_class(cfg)(cfg)
        self.mlp_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mlp = SwiGLU(cfg.d_model, cfg.ffn_hidden)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention_mode: str = "causal",
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        x = x + self.drop(self.attention(self.attn_norm(x), rope, attention_mode, cache))
        return x + self.drop(self.mlp(self.mlp_norm(x)))

    def output_projections(self) -> list[nn.Linear]:
        """The layers that write into the residual stream (zeroed by identity growth)."""
        return [self.attention.o, self.mlp.down]


def init_block_(block: Block, std: float, n_blocks: int) -> None:
    """Normal(0, std) weights; residual-writing projections scaled by 1/sqrt(2·n_blocks) (GPT-2)."""
    for module in block.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    for proj in block.output_projections():
        nn.init.normal_(proj.weight, mean=0.0, std=std / math.sqrt(2 * n_blocks))


def block_param_count(cfg: ModelConfig) -> int:
    """Parameters of one block, by formula (docs/model.md); tests check it against the module."""
    d, H, hd, ffn = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.ffn_hidden
    norms = 2 * d
    mlp = 3 * d * ffn
    if cfg.attention == "mla":
        kr = cfg.mla.kv_rank or max(1, d // 4)
        rd = LatentAttention.rope_dim(cfg)
        q_out = H * (hd + rd)
        qr = cfg.mla.q_rank
        q = (d * qr + qr + qr * q_out) if qr else d * q_out
        attn = q + d * kr + kr + 2 * kr * H * hd + d * rd + H * hd * d
    else:
        kv = cfg.n_kv_heads
        attn = 2 * d * H * hd + 2 * d * kv * hd + (H * hd + 2 * kv * hd if cfg.qkv_bias else 0)
    return norms + attn + mlp
