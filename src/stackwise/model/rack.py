"""The model plane: Embedding → Rack (ordered Stacks of Blocks) → Head.

A Stack is the unit that grows, freezes and is quantized. Each stack carries its role
(`trainable`, `frozen` or `adapted`) and storage precision, which `Rack.to_spec()` reports.
"""

from __future__ import annotations

import torch
from torch import nn

from stackwise.config import ModelConfig
from stackwise.model.head_loss import linear_cross_entropy_sum
from stackwise.model.kv_cache import KVCache
from stackwise.model.layers import Block, RMSNorm, Rotary, attention_class, init_block_
from stackwise.specs import EmbeddingSpec, HeadSpec, ModelSpec, RackSpec

ROLES = ("trainable", "frozen", "adapted")


class Stack(nn.Module):
    """An ordered group of blocks that trains, freezes and is quantized as one unit."""

    def __init__(self, cfg: ModelConfig, n_blocks: int | None = None):
        super().__init__()
        n = n_blocks if n_blocks is not None else cfg.architecture.stack_sizes[0]
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(n))
        self.role = "trainable"
        self.precision = "fp32"
        for block in self.blocks:
            init_block_(block, cfg.init_std, cfg.n_blocks)

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        attention_mode: str = "causal",
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        # A stack stored in bf16/fp16 computes in its own dtype and hands fp32 back to the rack.
        dtype = self.blocks[0].attn_norm.weight.dtype
        h = x.to(dtype)
        for block in self.blocks:
            h = block(h, rope, attention_mode, cache)
        return h.to(x.dtype)

    def freeze(self) -> None:
        self.requires_grad_(False)
        self.role = "frozen"

    def unfreeze(self) -> None:
        self.requires_grad_(True)
        self.role = "trainable"

    def __len__(self) -> int:
        return len(self.blocks)


class Rack(nn.Module):
    """The ordered stacks, plus the RoPE tables their blocks share.

    Stacks live in a ModuleDict keyed by a creation id ("0", "1", ...) kept in rack order, so a
    stack's parameter names never change when another stack is prepended or appended: optimizer
    state and checkpoints stay keyed by the same names across growth.
    """

    def __init__(self, cfg: ModelConfig, n_stacks: int | None = None):
        super().__init__()
        self.cfg = cfg
        sizes = cfg.architecture.stack_sizes if n_stacks is None else [cfg.architecture.stack_sizes[0]] * n_stacks
        self.stacks = nn.ModuleDict({str(i): Stack(cfg, n_blocks=size) for i, size in enumerate(sizes)})
        self.rotary = Rotary(attention_class(cfg).rope_dim(cfg), cfg.max_seq_len, cfg.rope_theta)

    def __len__(self) -> int:
        return len(self.stacks)

    def __getitem__(self, index: int) -> Stack:
        """The stack at rack position `index` (0 = nearest the embedding)."""
        return list(self.stacks.values())[index]

    def __iter__(self):
        return iter(self.stacks.values())

    @property
    def stack_ids(self) -> list[str]:
        return list(self.stacks.keys())

    def insert(self, position: int, stack: Stack) -> str:
        """Put a new stack at rack position `position`; returns its id (used in parameter names)."""
        new_id = str(max((int(k) for k in self.stacks), default=-1) + 1)
        items = list(self.stacks.items())
        items.insert(position, (new_id, stack))
        self.stacks = nn.ModuleDict(items)
        return new_id

    def forward(
        self,
        x: torch.Tensor,
        attention_mode: str = "causal",
        start: int = 0,
        end: int | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Run stacks [start, end) on hidden states x (B, T, d_model). With a `cache` (causal, whole
        rack), x's positions come after the cache's `length` and their keys and values are kept."""
        end = len(self.stacks) if end is None else end
        if not 0 <= start <= end <= len(self.stacks):
            raise IndexError(f"stack slice [{start}, {end}) is outside a rack of {len(self.stacks)} stacks")
        if cache is not None and (attention_mode != "causal" or (start, end) != (0, len(self.stacks))):
            raise ValueError("a KV cache serves causal attention over the whole rack")
        if cache is not None and torch.is_grad_enabled():
            # Its buffers are written in place at every call: autograd could not replay them.
            raise ValueError("a KV cache is for inference: call the rack under torch.no_grad()")
        offset = 0 if cache is None else cache.length
        rope = self.rotary(x.shape[1], x.device, offset)
        for stack in list(self.stacks.values())[start:end]:
            x = stack(x, rope, attention_mode, cache)
        if cache is not None:
            cache.length += x.shape[1]
        return x

    def to_spec(self) -> RackSpec:
        stacks = list(self.stacks.values())
        return RackSpec(
            n_stacks=len(stacks),
            blocks_per_stack=[len(s) for s in stacks],
            d_model=self.cfg.d_model,
            n_heads=self.cfg.n_heads,
            n_kv_heads=self.cfg.n_kv_heads,
            attention=self.cfg.attention,
            ffn_hidden=self.cfg.ffn_hidden,
            max_seq_len=self.cfg.max_seq_len,
            roles=[s.role for s in stacks],
            precisions=[s.precision for s in stacks],
            stack_ids=self.stack_ids,
        )


class Embedding(nn.Module):
    def __init__(self, vocab_size: int, d_model: int, init_std: float = 0.02, dropout: float = 0.0):
        super().__init__()
        self.tokens = nn.Embedding(vocab_size, d_model)
        self.drop = nn.Dropout(dropout)
        nn.init.normal_(self.tokens.weight, mean=0.0, std=init_std)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.drop(self.tokens(input_ids))

    def to_spec(self, tied: bool) -> EmbeddingSpec:
        return EmbeddingSpec(
            vocab_size=self.tokens.num_embeddings,
            d_model=self.tokens.embedding_dim,
            tied=tied,
            frozen=not self.tokens.weight.requires_grad,
        )


class Head(nn.Module):
    """Final RMSNorm and the projection to vocabulary logits (optionally tied to the embedding)."""

    def __init__(self, vocab_size: int, d_model: int, eps: float = 1e-5, init_std: float = 0.02):
        super().__init__()
        self.norm = RMSNorm(d_model, eps)
        self.proj = nn.Linear(d_model, vocab_size, bias=False)
        nn.init.normal_(self.proj.weight, mean=0.0, std=init_std)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(hidden))

    def loss_sum(self, hidden: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor | None = None) -> torch.Tensor:
        """Σ weight · cross-entropy of the logits of hidden rows (N, d_model) against labels (N,),
        in nats (fp32), without materializing the logits: projection and loss run fused in row
        chunks (model/head_loss.py). Equals `F.cross_entropy(self(hidden), labels)` summed."""
        return linear_cross_entropy_sum(self.norm(hidden), self.proj, labels, weights)

    def to_spec(self, tied: bool) -> HeadSpec:
        frozen = not any(p.requires_grad for p in self.parameters())
        return HeadSpec(d_model=self.proj.in_features, vocab_size=self.proj.out_features, tied=tied, frozen=frozen)


class StackWiseModel(nn.Module):
    """Embedding → Rack → Head. Sizes come from `ModelConfig`; `vocab_size` overrides the config's
    (the data plane's tokenizer decides it when the config leaves it out)."""

    def __init__(self, cfg: ModelConfig, vocab_size: int | None = None):
        super().__init__()
        vocab = vocab_size if vocab_size is not None else cfg.vocab_size
        if vocab is None:
            raise ValueError("model.vocab_size is not set and no tokenizer vocabulary was given")
        self.cfg = cfg
        self.embedding = Embedding(vocab, cfg.d_model, cfg.init_std, cfg.dropout)
        self.rack = Rack(cfg)
        self.head = Head(vocab, cfg.d_model, cfg.norm_eps, cfg.init_std)
        if cfg.tie_embeddings:
            self.head.proj.weight = self.embedding.tokens.weight

    @property
    def vocab_size(self) -> int:
        return self.embedding.tokens.num_embeddings

    @property
    def tied(self) -> bool:
        return self.head.proj.weight is self.embedding.tokens.weight

    def forward(
        self, input_ids: torch.Tensor, attention_mode: str = "causal", return_hidden: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, T, vocab); with `return_hidden`, also the rack's output (B, T, d_model)."""
        hidden = self.rack(self.embedding(input_ids), attention_mode)
        logits = self.head(hidden)
        return (logits, hidden) if return_hidden else logits

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mode: str = "causal") -> torch.Tensor:
        """Mean cross-entropy of the next-token predictions for (B, T) `input_ids` against (B, T)
        `labels` (already aligned: labels[:, i] is the target at position i), for a training loop
        of your own. Same value as `F.cross_entropy(self(input_ids).flatten(0, 1), labels.flatten())`
        but never holds the (B, T, vocab) logits: the head and the loss run fused in row chunks."""
        hidden = self.rack(self.embedding(input_ids), attention_mode)
        return self.head.loss_sum(hidden.flatten(0, 1), labels.flatten()) / labels.numel()

    def forward_from(
        self, hidden: torch.Tensor, start_stack: int, end_stack: int | None = None, attention_mode: str = "causal"
    ) -> torch.Tensor:
        """Run only stacks [start_stack, end_stack) on hidden states: the trunk cache feeds the
        output of stacks [0, start_stack) in here."""
        return self.rack(hidden, attention_mode, start=start_stack, end=end_stack)

    def to_spec(self) -> ModelSpec:
        return ModelSpec(
            embedding=self.embedding.to_spec(self.tied),
            rack=self.rack.to_spec(),
            head=self.head.to_spec(self.tied),
            trainable_parameters=sorted(n for n, p in self.named_parameters() if p.requires_grad),
        )

    def num_parameters(self, trainable_only: bool = False) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad or not trainable_only)
