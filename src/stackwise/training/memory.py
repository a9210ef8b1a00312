"""Memory planner: the peak training memory of a phase, estimated from shapes alone.

Works on a shapes-only (meta-device) model, so a 70B-shaped rack costs nothing to plan. The peak
of a training step is the sum of:

- weights: every parameter in its storage precision (NF4: 4 bits + one int8 scale per 64 values +
  the double-quantized scales, ≈ 4.13 bits a weight), and the RoPE tables (cos, sin: fp32,
  max_seq_len × rope_dim/2 each);
- gradients: one per trainable parameter, in its dtype;
- optimizer state: AdamW/Adam 2 moments per trainable parameter, SGD with momentum 1;
- activations saved for backward by every block that needs gradients (all blocks from the first
  one that trains, adapters included), per token per block, counted from what autograd saves for
  this block implementation: mha/gqa 11·d + 4·ffn + n_heads + 2 values, mla measured on a
  one-block probe (see `block_activation_values`; beyond 256 positions, extrapolated exactly
  from probes at 128 and 256, so a long sequence is never run);
- the loss: the head and cross-entropy run fused in row chunks (model/head_loss.py), so only one
  chunk of fp32 logits exists at a time (plus its bf16 copies under autocast), with the gradient
  of the scored rows (clm scores every position, masked objectives the masked ones; kept from
  forward to backward, scaled in place) and the head weight's gradient when it is added to an
  earlier micro-batch's (otherwise it becomes the weight's `.grad`, counted with the gradients);
- the activation cache (host RAM): one fp32 row of seq_len · d_model per distinct sample the phase
  draws, up to `run.cache_ram_mb` (rows beyond it go to a file on disk), and none in a phase that
  does not cache (`cache_resident_rows`);
- on CUDA with bf16 autocast, the bf16 copies of dense weights autocast keeps during a step.

`benchmarks/memory_planner.py` compares these estimates with measured peaks.
"""

from __future__ import annotations

import functools
from dataclasses import asdict, dataclass

import torch

from stackwise.config import ModelConfig
from stackwise.model import StackWiseModel
from stackwise.model.head_loss import chunk_rows
from stackwise.model.lora import LoRALinear
from stackwise.training.cache import distinct_draws

# NF4: 4 bits a value, an int8 scale per block of 64, and per group of (up to) 256 scales a
# double-quantization scale (fp32): 0.5 + 1/64 + 4/(64·256) bytes a weight.
NF4_BYTES_PER_VALUE = 0.5 + 1 / 64 + 4 / (64 * 256)
# Working memory of a step beyond what autograd saves, in units of one block's saved activations:
# the block in flight's temporaries and the freed memory the allocator keeps (see estimate_phase).
TRANSIENT_BLOCKS = 2
_DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


@dataclass
class MemoryEstimate:
    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    activations: float = 0.0
    transients: float = 0.0
    loss: float = 0.0
    cache: float = 0.0
    autocast_copies: float = 0.0

    @property
    def total(self) -> float:
        """Peak bytes on the training device. The cache lives in host RAM: on CUDA it is not
        part of this figure, on CPU add it (`host_total`)."""
        return (self.weights + self.gradients + self.optimizer + self.activations + self.transients + self.loss
                + self.autocast_copies)

    @property
    def host_total(self) -> float:
        """Peak bytes when the device is the host (CPU runs): the cache shares the memory."""
        return self.total + self.cache

    def peak(self, device: str) -> float:
        """The figure a user compares with their device: `host_total` on CPU, `total` otherwise."""
        return self.host_total if device == "cpu" else self.total

    def to_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def weight_bytes(model: torch.nn.Module) -> float:
    """Storage of every parameter and buffer, NF4 bases at NF4's size (works on meta models)."""
    total, seen = 0.0, set()
    for module in model.modules():
        for name, tensor in [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            nf4 = isinstance(module, LoRALinear) and name == "weight" and module.base_precision == "nf4"
            total += tensor.numel() * (NF4_BYTES_PER_VALUE if nf4 else tensor.element_size())
    return total


def estimate_phase(
    model: StackWiseModel,
    *,
    batch_size: int,
    seq_len: int,
    objective: str,
    mask_fraction: float,
    optimizer_type: str,
    momentum: float = 0.9,
    grad_accum_steps: int = 1,
    device: str = "cpu",
    autocast_bf16: bool = False,
    cache_windows: int = 0,
) -> MemoryEstimate:
    """Peak memory of one training step of `model` as it stands (roles and precisions set).
    `cache_windows`: the rows the phase's activation cache holds in RAM (`cache_resident_rows`)."""
    cfg = model.cfg
    trainable = [p for p in model.parameters() if p.requires_grad]
    grad_bytes = sum(p.numel() * p.element_size() for p in trainable)
    moments = 2 if optimizer_type in ("AdamW", "Adam") else (1 if momentum > 0 else 0)
    act_bytes = 2 if autocast_bf16 else 4
    micro = batch_size // grad_accum_steps
    tokens = micro * seq_len
    grad_blocks = _blocks_needing_grad(model)
    per_token = block_activation_values(cfg, seq_len)
    scored = tokens if objective == "clm" else tokens * mask_fraction
    estimate = MemoryEstimate(
        weights=weight_bytes(model) + rope_table_bytes(model),
        gradients=grad_bytes,
        optimizer=moments * grad_bytes,
        activations=grad_blocks * tokens * per_token * act_bytes + tokens * (2 * cfg.d_model + 1) * 4,
        # Working memory on top of what is saved: the temporaries of the block in flight (about
        # 0.4 of a block's saved activations, measured on CPU with glibc's mmap threshold pinned so
        # that freed memory goes back at once) and the freed memory the allocator keeps for reuse
        # (glibc's heap on CPU, the caching allocator on CUDA): about 2 blocks in all on CPU
        # (benchmarks/memory_planner).
        transients=TRANSIENT_BLOCKS * tokens * per_token * act_bytes,
        loss=loss_bytes(scored, model.vocab_size, cfg.d_model, _head_grad_added(model, grad_accum_steps), device,
                        autocast_bf16),
    )
    if cache_windows:
        estimate.cache = cache_windows * seq_len * cfg.d_model * 4
    if autocast_bf16:
        # Autocast keeps a bf16 copy of each dense matmul weight (embedding lookups are not cast).
        dense = sum(p.numel() for m in model.modules() for n, p in m.named_parameters(recurse=False)
                    if p.dim() == 2 and not isinstance(m, torch.nn.Embedding)
                    and not (isinstance(m, LoRALinear) and m.base_precision == "nf4"))
        estimate.autocast_copies = 2 * dense
    return estimate


def cache_resident_rows(phase_draws: int | None, n_windows: int, seq_len: int, d_model: int, ram_budget_mb: int) -> int:
    """Rows a phase's activation cache can hold in RAM: one per distinct sample the phase draws
    (at most one per window; all windows when the draws are not known), up to what the RAM budget
    holds. The caller passes 0 windows for a phase that does not cache."""
    rows = n_windows if phase_draws is None else distinct_draws(phase_draws, n_windows)
    return min(rows, ram_budget_mb * 2**20 // (seq_len * d_model * 4))


def rope_table_bytes(model: StackWiseModel) -> float:
    """The RoPE tables (cos and sin, max_seq_len × rope_dim/2 fp32 each) the model builds at its
    first forward, when not built yet (once built they are buffers, counted by weight_bytes)."""
    rotary = model.rack.rotary
    built = (rotary.cos.numel() + rotary.sin.numel()) * 4
    return max(0, 4 * rotary.max_seq_len * rotary.dim - built)


def loss_bytes(scored: float, vocab: int, d_model: int, head_grad_added: bool, device: str, autocast_bf16: bool) -> float:
    """Peak bytes of the fused head + cross-entropy over `scored` rows (model/head_loss.py): one
    chunk of logits, the rows' gradient, and the head's gradient when it is added to another one
    rather than becoming the weight's `.grad` (counted with the gradients)."""
    rows = chunk_rows(vocab, torch.device(device), max(1, int(scored)))
    chunk = rows * vocab * (4 + (2 * 2 if autocast_bf16 else 0))  # fp32 logits; bf16 product and gradient
    row_grads = scored * d_model * 4  # ∂hidden, computed in forward, scaled in place in backward
    weight_grad = vocab * d_model * 4 if head_grad_added else 0
    return chunk + row_grads + weight_grad


def _head_grad_added(model: StackWiseModel, grad_accum_steps: int) -> bool:
    """Whether the head's ∂W, computed in forward, is added to a `.grad` that already exists (an
    earlier micro-batch's), so that both are alive at the step's peak. Otherwise it becomes the
    `.grad` (a tied embedding's share arrives at the end of backward, past the peak)."""
    return model.head.proj.weight.requires_grad and grad_accum_steps > 1


def first_trainable_stack(model: StackWiseModel) -> int:
    """The lowest stack whose input may change (0 when the embedding trains): the stacks below
    it run without autograd, and their output may be cached."""
    if model.embedding.tokens.weight.requires_grad:
        return 0
    for position, stack in enumerate(model.rack):
        if any(p.requires_grad for p in stack.parameters()):
            return position
    return len(model.rack)


def _blocks_needing_grad(model: StackWiseModel) -> int:
    """Blocks whose activations autograd keeps: every block from the first trainable stack (its
    adapters count) up to the head; none below it (they run under no_grad)."""
    return sum(len(stack) for stack in list(model.rack)[first_trainable_stack(model):])


def block_activation_values(cfg: ModelConfig, seq_len: int) -> float:
    """Values autograd saves per token in one block. mha/gqa: exact formula for CPU's fused
    attention (which saves q, k, v, output and log-sum-exp). mla: its queries and keys are wider
    than its values, which sends attention down the unfused path that also keeps the T×T
    probabilities, so it is counted on a one-block probe at the real sequence length."""
    if cfg.attention != "mla":
        return 11 * cfg.d_model + 4 * cfg.ffn_hidden + cfg.n_heads + 2
    shape = (cfg.d_model, cfg.n_heads, cfg.ffn_hidden, cfg.mla.kv_rank, cfg.mla.q_rank, cfg.mla.rope_dim)
    if seq_len <= _PROBE_LONGEST:
        return _probe_mla(*shape, seq_len)
    # Per token, what the block saves is a + b·T (the T×T probabilities add n_heads·T): exact from
    # two probes, so a long sequence is never run (its T×T probabilities could not fit).
    short, long = _probe_mla(*shape, _PROBE_LONGEST // 2), _probe_mla(*shape, _PROBE_LONGEST)
    return long + (long - short) / (_PROBE_LONGEST // 2) * (seq_len - _PROBE_LONGEST)


_PROBE_LONGEST = 256  # longest sequence the MLA probe runs


@functools.cache
def _probe_mla(d_model: int, n_heads: int, ffn: int, kv_rank: int | None, q_rank: int | None, rope_dim: int | None,
               seq_len: int) -> float:
    """Count what one MLA block saves for backward, per token, on a one-sequence CPU forward."""
    from stackwise.config import StackWiseConfig
    from stackwise.model import Block
    from stackwise.model.layers import Rotary

    mla = {"kv_rank": kv_rank, "q_rank": q_rank, "rope_dim": rope_dim}
    cfg = StackWiseConfig.from_dict({"model": {"d_model": d_model, "n_heads": n_heads, "ffn_hidden": ffn, "attention": "mla",
                                               "mla": mla, "vocab_size": 8, "max_seq_len": seq_len},
                                     "training": {"seq_len": seq_len}, "data": {}}).model
    block = Block(cfg)
    rotary = Rotary(block.attention.rope_dim_, seq_len, cfg.rope_theta)
    rope = rotary(seq_len, torch.device("cpu"))
    skip = {p.untyped_storage().data_ptr() for p in block.parameters()} | {t.untyped_storage().data_ptr() for t in rope}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = t.untyped_storage().data_ptr()
        if key not in skip:
            saved[key] = max(saved.get(key, 0), t.untyped_storage().nbytes())
        return t

    x = torch.zeros(1, seq_len, d_model, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        block(x, rope, "causal")
    return sum(saved.values()) / (seq_len * 4)


def gib(n: float) -> str:
    return f"{n / 2**30:.2f}"
