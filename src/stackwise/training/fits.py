"""Will a run fit in memory? `check_fits` answers from shapes alone, before anything is allocated.

Two stages, both without allocating a tensor:

1. **Arithmetic lower bound** (`lower_bound`): what any phase needs at the least — the weights at
   their smallest storage (NF4 for block linears, bf16 for the embedding), the RoPE tables and the
   embedding's output for one micro-batch. Computed from the config's numbers alone, so a
   `d_model` of 10⁹ is refused in microseconds, before a shapes-only model whose sizes would not
   even fit in 64-bit byte counts is built. (Counts that would make building slow, e.g. 10⁶
   stacks, are refused earlier still, by the config's MAX_BLOCKS rule.)
2. **The memory planner** (training/memory.py, what `stackwise plan` shows): every phase replayed
   on a shapes-only model; its estimated peak compared with the device's memory.

A refusal is a ConfigError naming the config field most responsible (the one whose reduction to
a usual value shrinks the estimate most, from `_drivers`), the estimate and the device's memory
in GiB, and the override: `run.memory_check: false`. The activation cache is not counted: it is
bounded by `run.cache_ram_mb` and spills to files beyond that.

The device's memory is CUDA's total memory of the device, or the host's RAM (MemTotal from
/proc/meminfo or sysconf, lowered to a cgroup memory limit when one is set).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from stackwise.config import ConfigError, Ramp, StackWiseConfig, rack_sizes
from stackwise.training.memory import MemoryEstimate, estimate_phase, first_trainable_stack

GIB = 2**30


# ---- the device's memory --------------------------------------------------------------------------


def host_memory_bytes() -> int | None:
    """Physical RAM of this host, lowered to the cgroup's memory limit when one is set."""
    total = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                total = int(line.split()[1]) * 1024
                break
    except (OSError, ValueError, IndexError):
        pass
    if total is None:
        try:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    for limit_file in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            limit = int(Path(limit_file).read_text().strip())
        except (OSError, ValueError):  # missing, or "max" (no limit)
            continue
        if 0 < limit < total:
            total = limit
    return total


def resolve_device(device: Any) -> str:
    """'auto' → 'cuda' when available else 'cpu'; 'cuda:N' and torch.device accepted."""
    device = str(device)
    if device == "auto":
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def device_memory(device: Any) -> tuple[int, str] | None:
    """(bytes, description) of `device`'s memory, or None when it cannot be known (no CUDA)."""
    device = resolve_device(device)
    if device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            return None
        index = int(device.partition(":")[2] or torch.cuda.current_device())
        props = torch.cuda.get_device_properties(index)
        return int(props.total_memory), f"memory of CUDA device {index} ({props.name})"
    total = host_memory_bytes()
    return (total, "host RAM") if total else None


# ---- stage 1: arithmetic ------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shape:
    """The numbers that drive a phase's memory."""

    vocab: int
    d: int
    ffn: int
    heads: int
    kv_heads: int
    tied: bool
    blocks: int
    max_seq_len: int
    rope_dim: int
    tokens: int  # per micro-batch
    lora_rank: int

    def block_params(self) -> int:
        head_dim = self.d // self.heads
        attention = 2 * self.d * self.heads * head_dim + 2 * self.d * self.kv_heads * head_dim
        return attention + 3 * self.d * self.ffn

    def rope_bytes(self) -> int:
        return 4 * self.max_seq_len * self.rope_dim  # cos and sin, (max_seq_len, rope_dim / 2) fp32 each

    def lower_bound(self) -> float:
        """Bytes any phase of this shape needs at the least."""
        embedding = self.vocab * self.d * (1 if self.tied else 2) * 2  # never below bf16
        linears = self.blocks * 3 * self.d * self.ffn * 0.5  # the MLPs alone, at NF4's 4 bits at best
        return embedding + linears + self.rope_bytes() + self.tokens * self.d * 4

    def rough(self) -> float:
        """A rough all-trainable fp32 AdamW estimate, used only to tell which field drives the size."""
        params = self.vocab * self.d * (1 if self.tied else 2) + self.blocks * self.block_params()
        params += self.blocks * 7 * self.lora_rank * 2 * max(self.d, self.ffn) if self.lora_rank else 0
        per_token = 11 * self.d + 4 * self.ffn + self.heads + 2
        activations = 3 * self.tokens * self.blocks * per_token * 4 + self.tokens * (2 * self.d + 1) * 4
        loss = self.tokens * self.d * 4 + min(self.tokens, 4096) * self.vocab * 4
        return 16 * params + activations + loss + self.rope_bytes()


def _phase_shapes(config: StackWiseConfig) -> list[tuple[str, _Shape, dict[str, tuple[str, Any]]]]:
    """(phase name, shape, {driver: (config path, value)}) for each phase, from numbers alone."""
    from stackwise.model.layers import attention_class
    from stackwise.training.structure import planned_vocab

    m = config.model
    racks, _ = rack_sizes(config)
    start_blocks = sum(m.architecture.stack_sizes)
    target = config.training.progressive.target_stacks
    arch_key = "model.architecture.n_stacks" if m.architecture.n_stacks > 1 else "model.architecture.blocks_per_stack"
    phases: list[tuple[str, Any, int, str]] = []  # (name, phase config or None, blocks, what set the block count)
    if config.schedule is None:
        blocks, source = start_blocks, arch_key
        if target is not None and target > m.architecture.n_stacks:
            neighbour = m.architecture.stack_sizes[-1 if config.training.progressive.where == "append" else 0]
            blocks += (target - m.architecture.n_stacks) * neighbour
            source = "training.progressive.target_stacks"
        phases.append(("main", None, blocks, source))
    else:
        source, previous = arch_key, start_blocks
        for i, phase in enumerate(config.schedule):
            sizes = racks[i] if i < len(racks) else None
            blocks = sum(sizes) if sizes is not None else previous
            if blocks > previous and blocks - previous > start_blocks:
                source = f"schedule.{i}.model_config.grow"
            phases.append((phase.name, phase, blocks, source))
            previous = blocks
    vocab = planned_vocab(config)
    rope_dim = attention_class(m).rope_dim(m)
    out = []
    for name, phase, blocks, blocks_key in phases:
        over = phase.data_config if phase is not None else None
        batch = (over.batch_size if over and over.batch_size else None) or config.training.batch_size
        seq = (over.seq_len if over and over.seq_len else None) or config.training.seq_len
        index = config.schedule.index(phase) if phase is not None else None
        batch_key = (f"schedule.{index}.data_config.batch_size" if over and over.batch_size else "training.batch_size")
        seq_key = (f"schedule.{index}.data_config.seq_len" if over and over.seq_len else "training.seq_len")
        lora = phase.model_config_.lora if phase is not None else config.training.progressive.lora
        lora_key = (f"schedule.{index}.model_config.lora.rank" if phase is not None else "training.progressive.lora.rank")
        uses_lora = (phase.model_config_.trunk if phase is not None else config.training.progressive.trunk) == "qlora"
        shape = _Shape(vocab=vocab, d=m.d_model, ffn=m.ffn_hidden, heads=m.n_heads, kv_heads=m.n_kv_heads,
                       tied=m.tie_embeddings, blocks=blocks, max_seq_len=m.max_seq_len, rope_dim=rope_dim,
                       tokens=batch // config.training.grad_accum_steps * seq, lora_rank=lora.rank if uses_lora else 0)
        drivers = {
            "d": ("model.d_model", m.d_model), "vocab": ("model.vocab_size", vocab),
            "ffn": ("model.ffn_hidden", m.ffn_hidden), "max_seq_len": ("model.max_seq_len", m.max_seq_len),
            "batch": (batch_key, batch), "seq": (seq_key, seq), "blocks": (blocks_key, blocks),
            "lora_rank": (lora_key, lora.rank),
        }
        out.append((name, shape, drivers))
    return out


def _culprit(config: StackWiseConfig, shape: _Shape, drivers: dict[str, tuple[str, Any]]) -> tuple[str, Any]:
    """The config field whose reduction to a usual value shrinks the rough estimate most."""
    explicit_ffn = "ffn_hidden" in config.model.model_fields_set
    usual = {
        "d": lambda s: replace(s, d=min(s.d, 256), ffn=s.ffn if explicit_ffn else min(s.ffn, 688)),
        "vocab": lambda s: replace(s, vocab=min(s.vocab, 32768)),
        "ffn": lambda s: replace(s, ffn=min(s.ffn, max(16, 8 * s.d // 3))),
        "max_seq_len": lambda s: replace(s, max_seq_len=min(s.max_seq_len, 4096)),
        "batch": lambda s: replace(s, tokens=min(s.tokens, 8 * (s.tokens // max(1, drivers["batch"][1])))),
        "seq": lambda s: replace(s, tokens=min(s.tokens, 2048 * max(1, s.tokens // max(1, drivers["seq"][1])))),
        "blocks": lambda s: replace(s, blocks=min(s.blocks, 8)),
        "lora_rank": lambda s: replace(s, lora_rank=min(s.lora_rank, 8)),
    }
    best = min(usual, key=lambda k: usual[k](shape).rough())
    return drivers[best]


# ---- stage 2: the planner -----------------------------------------------------------------------


def mask_fraction(data: dict[str, Any]) -> float:
    """Share of positions scored by the loss (for the planner's loss term)."""
    if data["objective"] == "mlm":
        rate = data["mask_rate"]
        return max(rate.start, rate.end) if isinstance(rate, Ramp) else rate
    if data["objective"] == "diffusion":
        return sum(data["mask_range"]) / 2
    return 1.0


def phase_memory(config: StackWiseConfig, model: Any, phase: Any, data: dict[str, Any], optimizer: Any,
                 device: str, windows: Any, world_size: int = 1) -> MemoryEstimate:
    """The planner's estimate of one phase's peak on `device` (per rank: each of `world_size`
    data-parallel ranks takes its slice of the batch)."""
    autocast = device.startswith("cuda") and config.run.precision in ("auto", "bf16")
    return estimate_phase(
        model,
        batch_size=max(1, data["batch_size"] // world_size), seq_len=data["seq_len"], objective=data["objective"],
        mask_fraction=mask_fraction(data), optimizer_type=optimizer.optimizer_type, momentum=optimizer.momentum,
        grad_accum_steps=config.training.grad_accum_steps, device="cuda" if device.startswith("cuda") else device,
        autocast_bf16=autocast, cache_windows=_cache_rows(config, model, phase, data, windows, world_size),
    )


def _cache_rows(config: StackWiseConfig, model: Any, phase: Any, data: dict[str, Any], windows: Any,
                world_size: int) -> int:
    """The rows a phase's activation cache holds in RAM per rank (0 when the phase does not cache,
    e.g. when it draws under one epoch): what the phase can fill, not the corpus size."""
    from stackwise.time_units import step_at
    from stackwise.training.cache import cache_decision, cache_off_reason
    from stackwise.training.memory import cache_resident_rows
    from stackwise.training.schedule import PhaseSchedule, data_orders

    if not windows:
        return 0
    n_windows, total = windows(data["seq_len"]), config.training.total_steps
    first = first_trainable_stack(model)
    if not total:  # the run length, hence the phase's draws, unknown: the whole corpus where valid
        valid = cache_off_reason(config.run.activation_cache, first, data["objective"], data["mask_rate"]) is None
        return cache_resident_rows(None, n_windows if valid else 0, data["seq_len"], model.cfg.d_model,
                                   config.run.cache_ram_mb)
    draws = (step_at(phase.end_t, total) - step_at(phase.start_t, total)) * data["batch_size"]
    # Where in the window order the phase starts: it continues what earlier phases on the same
    # corpus drew (schedule.data_orders), as the machine decides at the phase's start.
    names = [p.name for p in PhaseSchedule.from_config(config, total)]
    offset = data_orders(config, total)[names.index(phase.name)][1] if phase.name in names else 0
    decision = cache_decision(config.run.activation_cache, first, data["objective"], data["mask_rate"],
                              phase=phase.name, draws=draws, n_windows=n_windows, offset_in_epoch=offset)
    if not decision.on:
        return 0
    mine = -(-draws // world_size)  # each rank keeps the samples it draws
    return cache_resident_rows(mine, n_windows, data["seq_len"], model.cfg.d_model, config.run.cache_ram_mb)


def _world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


# ---- the check ----------------------------------------------------------------------------------


def _refusal(config: StackWiseConfig, phase: str, estimate: float, capacity: int, what: str, device: str,
             shape: _Shape, drivers: dict[str, tuple[str, Any]], at_least: bool, parts: str = "") -> ConfigError:
    path, value = _culprit(config, shape, drivers)
    amount = f"at least {estimate / GIB:,.1f} GiB" if at_least else f"an estimated {estimate / GIB:,.1f} GiB"
    message = (f"too large to fit: phase {phase!r} would need {amount}{parts} on {device}, more than the "
               f"{capacity / GIB:,.1f} GiB of {what}, and this value contributes most (reduce it, or set "
               "run.memory_check: false to run anyway)")
    return ConfigError([(path, message, value)])


def check_fits(config: StackWiseConfig, total_steps: int, device: str) -> None:
    """Raise ConfigError when a phase of the run cannot fit in `device`'s memory (see the module
    docstring); nothing when it fits, when `run.memory_check` is false, or when the device's
    memory cannot be known. Allocates nothing; takes well under a second for usual configs."""
    if not config.run.memory_check:
        return
    device = resolve_device(device)
    known = device_memory(device)
    if known is None:
        return
    capacity, what = known
    shapes = _phase_shapes(config)
    for name, shape, drivers in shapes:
        bound = shape.lower_bound()
        if bound > capacity:
            raise _refusal(config, name, bound, capacity, what, device, shape, drivers, at_least=True)
    from stackwise.training.schedule import resolve_data, resolve_optimizer
    from stackwise.training.structure import replay_phases

    world = _world_size()
    sharded = world if config.run.distributed == "fsdp" else 1
    by_name = {name: (shape, drivers) for name, shape, drivers in shapes}
    for _, phase, model in replay_phases(config, total_steps):
        data = resolve_data(config, phase, tau=None)
        optimizer = resolve_optimizer(config.training.optimizer, phase)
        memory = phase_memory(config, model, phase, data, optimizer, device, None, world)
        state = memory.weights + memory.gradients + memory.optimizer
        peak = memory.total - state + state / sharded
        if peak > capacity:
            shape, drivers = by_name.get(phase.name, shapes[-1][1:])
            top = sorted(((k, v) for k, v in memory.to_dict().items() if k not in ("total", "cache") and v), key=lambda kv: -kv[1])
            parts = " (" + ", ".join(f"{k} {v / GIB:,.1f}" for k, v in top[:3]) + " GiB)"
            raise _refusal(config, phase.name, peak, capacity, what, device, shape, drivers, at_least=False, parts=parts)


__all__ = ["GIB", "check_fits", "device_memory", "host_memory_bytes", "mask_fraction", "phase_memory"]
