"""Training FLOPs of a step, counted from the phase's structure (docs/training.md, "Compute (FLOPs)").

Analytic, never measured: a step's FLOPs follow from which weights run forward, which run
backward, which train, how many rows the activation cache served and how many positions the
head scores. With F = 2·P + 2·T·d the forward FLOPs of one block per token (P its matmul weights,
T the sequence length, d the model width; norms, biases, RoPE and softmax are left out), per token:

- a block below the lowest trainable parameter (it runs under no_grad): F, and 0 for the rows
  the activation cache serves;
- a block from there up: its weights 3·2P when they train, 2·2P when frozen (forward and the
  gradient of their input, no weight gradient); its attention core (QKᵀ, AV: 2·T·d) 3× whatever
  the block's role, since both operands of those products are activations;
- LoRA adapters (they always train): 3·2·P_lora; an NF4 base counts as a frozen weight, and each
  use of it decodes it once (1 operation per value, per micro-batch, forward and backward);
- the head (V·d): 2·V·d per scored row, + 2·V·d when something below it trains (the gradient of
  its input), + 2·V·d when it trains; embedding lookups: 0.

The machine (training/machine.py) adds each step's count to the run's total, an exact integer.
`stackwise plan` (cli/plan.py) uses the same counts per phase, and `end_to_end_flops` for the
final model trained with everything trainable on the same tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from stackwise.data.batch import Batch
from stackwise.model import StackWiseModel
from stackwise.model.lora import LoRALinear
from stackwise.training.memory import first_trainable_stack

# One operation per NF4 value at each decode: its code is looked up and multiplied by its block's scale.
DEQUANT_FLOPS_PER_VALUE = 1


@dataclass(frozen=True)
class BlockWeights:
    """A block's matmul weights by what they do in a step (values, not bytes)."""

    trained: int = 0  # dense weights that train
    frozen: int = 0  # frozen weights (dense, bf16 or NF4 bases)
    adapters: int = 0  # LoRA A and B (they train)
    nf4: int = 0  # of `frozen`, the values stored in NF4 (decoded at every use)


@dataclass(frozen=True)
class StepCost:
    """A phase's FLOPs per unit of work, computed once from its structure.

    Per token: `*_matmul` (weights) + `*_attention` × seq_len (the attention core); the trunk
    is the stacks below the first trainable one (forward only, skipped on cache hits), `upper`
    the rest. Per scored row: `head`. Per micro-batch: the NF4 decodes of the trunk (when it
    runs) and of the upper stacks."""

    trunk_matmul: int
    trunk_attention: int
    upper_matmul: int
    upper_attention: int
    head: int
    trunk_dequant: int
    upper_dequant: int

    def step(self, batch_size: int, seq_len: int, scored_rows: int | None = None, cache_hit_rows: int = 0,
             micro_batches: int = 1) -> int:
        """FLOPs of one step of `batch_size` windows of `seq_len` tokens, the head scoring
        `scored_rows` positions (default: every one), `cache_hit_rows` windows served by the
        activation cache, over `micro_batches` micro-batches of equal size."""
        computed = batch_size - cache_hit_rows
        trunk = (self.trunk_matmul + self.trunk_attention * seq_len) * computed * seq_len
        upper = (self.upper_matmul + self.upper_attention * seq_len) * batch_size * seq_len
        head = self.head * (batch_size * seq_len if scored_rows is None else scored_rows)
        # The cache serves whole micro-batches: those it did not serve decoded the trunk's NF4 bases.
        trunk_runs = computed * micro_batches // batch_size if batch_size else 0
        return trunk + upper + head + self.trunk_dequant * trunk_runs + self.upper_dequant * micro_batches


def block_weights(block: nn.Module) -> BlockWeights:
    """The matmul weights of a block's linear layers (biases and norms are not matmuls)."""
    trained = frozen = adapters = nf4 = 0
    for module in block.modules():
        if isinstance(module, LoRALinear):
            base = module.out_features * module.in_features
            frozen += base
            nf4 += base if module.base_precision == "nf4" else 0
            adapters += module.rank * (module.in_features + module.out_features)
        elif isinstance(module, nn.Linear):
            if module.weight.requires_grad:
                trained += module.weight.numel()
            else:
                frozen += module.weight.numel()
    return BlockWeights(trained, frozen, adapters, nf4)


def step_cost(model: StackWiseModel) -> StepCost:
    """The FLOP counts of a training step of `model` as it stands (roles and precisions set).
    Works on a shapes-only (meta) model too."""
    first = first_trainable_stack(model)
    d = model.cfg.d_model
    trunk_matmul = trunk_attention = upper_matmul = upper_attention = trunk_dequant = upper_dequant = 0
    for position, stack in enumerate(model.rack):
        for block in stack.blocks:
            w = block_weights(block)
            if position < first:  # no autograd: forward only
                trunk_matmul += 2 * (w.trained + w.frozen + w.adapters)
                trunk_attention += 2 * d
                trunk_dequant += DEQUANT_FLOPS_PER_VALUE * w.nf4
            else:
                upper_matmul += 3 * 2 * (w.trained + w.adapters) + 2 * 2 * w.frozen
                upper_attention += 3 * 2 * d
                upper_dequant += 2 * DEQUANT_FLOPS_PER_VALUE * w.nf4
    return StepCost(trunk_matmul, trunk_attention, upper_matmul, upper_attention, _head_flops(model, first),
                    trunk_dequant, upper_dequant)


def _head_flops(model: StackWiseModel, first: int) -> int:
    """Per scored row: forward 2·V·d, the gradient of its input when anything below trains,
    the gradient of its weight when it trains."""
    weight = model.head.proj.weight
    vd = weight.numel()
    below_trains = first < len(model.rack)
    return 2 * vd + (2 * vd if below_trains else 0) + (2 * vd if weight.requires_grad else 0)


def end_to_end_cost(model: StackWiseModel) -> StepCost:
    """The step cost of `model` trained end to end: every block's weights dense and trainable
    (adapters merged, no NF4), the embedding and head trainable, no cache."""
    d = model.cfg.d_model
    matmul = attention = 0
    for stack in model.rack:
        for block in stack.blocks:
            w = block_weights(block)
            matmul += 3 * 2 * (w.trained + w.frozen)
            attention += 3 * 2 * d
    return StepCost(0, 0, matmul, attention, 6 * model.head.proj.weight.numel(), 0, 0)


def step_flops(model: StackWiseModel | StepCost, *, batch_size: int, seq_len: int, scored_rows: int | None = None,
               cache_hit_rows: int = 0, micro_batches: int = 1) -> int:
    """FLOPs of one training step of `model` (or of a `StepCost`): see `StepCost.step`."""
    cost = model if isinstance(model, StepCost) else step_cost(model)
    return cost.step(batch_size, seq_len, scored_rows, cache_hit_rows, micro_batches)


def phase_flops(model: StackWiseModel | StepCost, *, steps: int, batch_size: int, seq_len: int,
                scored_fraction: float = 1.0, cache_hit_rows: int = 0, micro_batches: int = 1) -> float:
    """FLOPs of `steps` steps of one phase; `cache_hit_rows`: windows the cache serves over the
    whole phase; `scored_fraction`: the share of positions the head scores (1 for clm)."""
    cost = model if isinstance(model, StepCost) else step_cost(model)
    rows = steps * batch_size
    computed = rows - cache_hit_rows
    trunk = (cost.trunk_matmul + cost.trunk_attention * seq_len) * computed * seq_len
    upper = (cost.upper_matmul + cost.upper_attention * seq_len) * rows * seq_len
    head = cost.head * rows * seq_len * scored_fraction
    dequant = cost.trunk_dequant * micro_batches * computed / batch_size + cost.upper_dequant * micro_batches * steps
    return trunk + upper + head + dequant


def end_to_end_flops(model: StackWiseModel, tokens: int, seq_len: int, scored_fraction: float = 1.0) -> float:
    """FLOPs of training `model` (the run's final model) end to end, everything trainable, on
    `tokens` tokens in windows of `seq_len`."""
    cost = end_to_end_cost(model)
    per_token = cost.upper_matmul + cost.upper_attention * seq_len + cost.head * scored_fraction
    return per_token * tokens


def scored_rows(batch: Batch) -> int:
    """The positions the head projects in this batch (metrics.loss_sum): every one for clm,
    the loss positions otherwise. Batches are built on the host, so this costs no device sync."""
    if batch.objective == "clm" and not batch.partial_loss:
        return batch.n_tokens
    return int(batch.loss_mask.sum())


# ---- model FLOP utilization on CUDA ----------------------------------------------------------

# Dense peak TFLOP/s (no sparsity) by GPU: bf16 tensor cores, TF32 tensor cores, plain fp32.
# Matched on the device name, most specific first (docs/training.md, "Compute (FLOPs)").
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    ("H200", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("H100 PCIe", {"bf16": 756.0, "tf32": 378.0, "fp32": 51.2}),
    ("H100", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    ("A100", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
]


def peak_flops(device: torch.device, autocast_dtype: torch.dtype | None) -> float | None:
    """This GPU's dense peak FLOP/s for the run's matmul precision, or None (not CUDA, or a GPU
    the table does not know)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS:
        if key in name:
            return 1e12 * peaks[_matmul_precision(autocast_dtype)]
    return None


def _matmul_precision(autocast_dtype: torch.dtype | None) -> str:
    if autocast_dtype in (torch.bfloat16, torch.float16):
        return "bf16"  # fp16 tensor cores run at the bf16 rate
    return "tf32" if torch.backends.cuda.matmul.allow_tf32 else "fp32"


# ---- the run's count ---------------------------------------------------------------------------


class FlopsMeter:
    """A run's cumulative training FLOPs (an exact integer, kept in checkpoints; None for a run
    resumed from a checkpoint made before FLOPs were counted) and, per logged window, its FLOPs
    and activation-cache hits. Everything it counts is known on the host: no device sync."""

    def __init__(self) -> None:
        self.total: int | None = 0
        self.cost: StepCost | None = None
        self._window_flops = 0
        self._window_hits = 0
        self._window_lookups = 0

    def enter(self, model: StackWiseModel) -> None:
        """The structure of a phase (entered or restored) is settled: count its steps from it."""
        self.cost = step_cost(model)

    def add_step(self, batch: Batch, micro_batches: int, ranks: int, cache_hits: int, cache_lookups: int) -> None:
        """One step of this rank's `batch`, of which `cache_hits` windows came from the cache
        (`cache_lookups` windows were looked up); every one of `ranks` ranks did as much."""
        flops = self.cost.step(batch.batch_size, batch.seq_len, scored_rows(batch), cache_hits, micro_batches) * ranks
        if self.total is not None:
            self.total += flops
        self._window_flops += flops
        self._window_hits += cache_hits
        self._window_lookups += cache_lookups

    def window(self, elapsed: float, peak: float | None) -> dict[str, float]:
        """The fields of a step record for the window just logged (then a new window starts):
        cumulative `flops`, `flops_per_s`, `mfu` (with a known peak), `cache_hit_rate` (when the
        cache was looked up)."""
        fields = self.fields()
        fields["flops_per_s"] = self._window_flops / max(elapsed, 1e-9)
        if peak:
            fields["mfu"] = fields["flops_per_s"] / peak
        if self._window_lookups:
            fields["cache_hit_rate"] = self._window_hits / self._window_lookups
        self._window_flops = self._window_hits = self._window_lookups = 0
        return fields

    def fields(self) -> dict[str, float]:
        """`flops` for a record (nothing when the run's count is unknown)."""
        return {} if self.total is None else {"flops": float(self.total)}
