"""`stackwise plan`: the timeline of a config, phase by phase, with a memory estimate, without
training."""

from __future__ import annotations

from typing import Any

from stackwise.config import LrSchedule, StackWiseConfig
from stackwise.training.fits import mask_fraction as _mask_fraction  # noqa: F401 (re-exported)
from stackwise.training.fits import phase_memory
from stackwise.training.memory import gib
from stackwise.training.progressive import with_growth_schedule
from stackwise.training.schedule import PhaseSchedule, resolve_data, resolve_optimizer
from stackwise.training.structure import (  # noqa: F401 (planned_vocab: re-exported)
    planned_vocab,
    replay_phases,
)


def plan_rows(config: StackWiseConfig, total_steps: int, device: str = "cpu", windows: Any = None) -> list[dict[str, Any]]:
    """One row per phase: steps, tokens, objective, shapes, stacks and blocks, parameters,
    trainable, lr shape, and the estimated peak memory of its steps on `device`. The structure
    comes from the run's own growth operators (`apply_model_phase`) replayed on a shapes-only
    model. `windows(seq_len)` gives the number of training windows (for the activation cache),
    when the corpus is known."""
    config = with_growth_schedule(config)
    ranges = PhaseSchedule.from_config(config, total_steps).step_ranges(total_steps)
    rows = []
    # Shapes only (training/structure.py): a 70B-shaped plan allocates nothing.
    for index, phase, model in replay_phases(config, total_steps):
        first, end = ranges[index]
        data = resolve_data(config, phase, tau=None)
        optimizer = resolve_optimizer(config.training.optimizer, phase)
        memory = phase_memory(config, model, phase, data, optimizer, device, windows)
        steps = end - first
        rows.append({
            "phase": phase.name,
            "t": f"{phase.start_t:.3f}-{phase.end_t:.3f}",
            "steps": steps,
            "tokens": steps * data["batch_size"] * data["seq_len"],
            "objective": data["objective"],
            "batch": f"{data['batch_size']}x{data['seq_len']}",
            "stacks": len(model.rack),
            "blocks": sum(len(stack) for stack in model.rack),  # depth: growth operators change it unevenly
            "params": model.num_parameters(),
            "trainable": model.num_parameters(trainable_only=True),
            "lr": describe_lr(optimizer.lr),
            "optimizer": optimizer.optimizer_type,
            "mem_GiB": gib(memory.peak(device)),
            "memory": memory,
        })
    return rows


def memory_table(rows: list[dict[str, Any]], device: str) -> str:
    """Per phase, where the estimated peak goes (GiB)."""
    parts = ["weights", "gradients", "optimizer", "activations", "transients", "loss", "autocast_copies", "cache"]
    table = []
    for row in rows:
        memory = row["memory"].to_dict()
        table.append({"phase": row["phase"], **{k: gib(memory[k]) for k in parts}, "peak": gib(row["memory"].peak(device))})
    note = "cache is host RAM (counted in the CPU peak)" if device == "cpu" else "cache is host RAM (not in the GPU peak)"
    return format_table(table) + f"\n(estimated peak training memory on {device}, GiB; {note})"


def describe_lr(lr: float | LrSchedule) -> str:
    if isinstance(lr, LrSchedule):
        warm = f"warmup {lr.warmup:.0%} → " if lr.warmup else ""
        return f"{warm}{lr.schedule} {lr.peak:.1e}→{lr.final:.1e}" if lr.schedule != "constant" else f"{warm}{lr.peak:.1e}"
    return f"{lr:.1e}"


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    rows = [{k: v for k, v in row.items() if k != "memory"} for row in rows]
    cells = [{k: _fmt(v) for k, v in row.items()} for row in rows]
    widths = {k: max(len(k), *(len(c[k]) for c in cells)) for k in rows[0]}
    lines = ["  ".join(k.ljust(widths[k]) for k in widths)]
    lines.append("  ".join("-" * widths[k] for k in widths))
    lines += ["  ".join(c[k].ljust(widths[k]) for k in widths) for c in cells]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    if isinstance(value, int) and value >= 10_000:
        return f"{value / 1e6:.2f}M" if value < 1e9 else f"{value / 1e9:.2f}B"
    return str(value)
