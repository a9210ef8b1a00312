"""`stackwise plan`: the timeline of a config, phase by phase, without training."""

from __future__ import annotations

from typing import Any

import torch

from stackwise.config import LrSchedule, StackWiseConfig
from stackwise.data.tokenizer import SPECIAL_TOKENS
from stackwise.model import StackWiseModel
from stackwise.training.progressive import apply_model_phase
from stackwise.training.schedule import PhaseSchedule, resolve_data, resolve_optimizer


def planned_vocab(config: StackWiseConfig) -> int:
    """The vocabulary the run will have, known without reading the corpus."""
    if config.model.vocab_size is not None:
        return config.model.vocab_size
    if config.data.use_dummy_data:
        return 512
    if config.data.tokenizer.kind == "bpe":
        return config.data.tokenizer.vocab_size
    return 256 + len(SPECIAL_TOKENS)


def plan_rows(config: StackWiseConfig, total_steps: int) -> list[dict[str, Any]]:
    """One row per phase: steps, tokens, objective, shapes, parameters, trainable, lr shape."""
    schedule = PhaseSchedule.from_config(config, total_steps)
    with torch.device("meta"):  # shapes only: a 70B-shaped plan allocates nothing
        model = StackWiseModel(config.model, vocab_size=planned_vocab(config))
    rows = []
    for index, (phase, (first, end)) in enumerate(zip(schedule.phases, schedule.step_ranges(total_steps), strict=True)):
        with torch.device("meta"):
            apply_model_phase(model, phase.model, index, config)
        data = resolve_data(config, phase)
        optimizer = resolve_optimizer(config.training.optimizer, phase)
        steps = end - first
        rows.append({
            "phase": phase.name,
            "t": f"{phase.start_t:.3f}-{phase.end_t:.3f}",
            "steps": steps,
            "tokens": steps * data["batch_size"] * data["seq_len"],
            "objective": data["objective"],
            "batch": f"{data['batch_size']}x{data['seq_len']}",
            "stacks": len(model.rack),
            "params": model.num_parameters(),
            "trainable": model.num_parameters(trainable_only=True),
            "lr": describe_lr(optimizer.lr),
            "optimizer": optimizer.optimizer_type,
        })
    return rows


def describe_lr(lr: float | LrSchedule) -> str:
    if isinstance(lr, LrSchedule):
        warm = f"warmup {lr.warmup:.0%} → " if lr.warmup else ""
        return f"{warm}{lr.schedule} {lr.peak:.1e}→{lr.final:.1e}" if lr.schedule != "constant" else f"{warm}{lr.peak:.1e}"
    return f"{lr:.1e}"


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
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
