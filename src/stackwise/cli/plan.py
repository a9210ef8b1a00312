"""`stackwise plan`: the timeline of a config, phase by phase, with a memory estimate, without
training.

Each phase's place in the run is shown in all four units, as [start, end) ranges: t, steps,
tokens (batch_size × seq_len per step) and epochs (passes over the phase's training windows; "-"
when the corpus is not read, `--no-data`). docs/schedule.md, "Time in tokens and epochs"."""

from __future__ import annotations

from typing import Any

from stackwise.config import Ramp, StackWiseConfig, TrainTokens
from stackwise.time_units import clock_positions
from stackwise.training.fits import mask_fraction as _mask_fraction  # noqa: F401 (re-exported)
from stackwise.training.fits import phase_memory
from stackwise.training.flops import end_to_end_flops, phase_flops, step_cost
from stackwise.training.memory import gib
from stackwise.training.progressive import with_growth_schedule
from stackwise.training.schedule import PhaseSchedule, lr_summary, resolve_data, resolve_optimizer
from stackwise.training.structure import (  # noqa: F401 (planned_vocab: re-exported)
    planned_vocab,
    replay_phases,
)


def plan_rows(config: StackWiseConfig, total_steps: int | None = None, device: str = "cpu", windows: Any = None,
              train_tokens: TrainTokens = None) -> list[dict[str, Any]]:
    """One row per phase: its range in t, steps, tokens and epochs, shapes, stacks and blocks,
    objective, parameters, trainable, lr shape, and the estimated peak memory of its steps on
    `device`. The structure comes from the run's own growth operators (`apply_model_phase`)
    replayed on a shapes-only model. `windows(seq_len)` gives the number of training windows (for
    the activation cache), and `train_tokens` the training split's token count (for epochs: see
    `StackWiseConfig.time_rates`), when the corpus is known. A config in tokens or epochs is
    converted to steps first (`total_steps`, if given, is the run length)."""
    config = with_growth_schedule(config).in_steps(total_steps, train_tokens)
    total_steps = config.training.total_steps
    ranges = PhaseSchedule.from_config(config, total_steps).step_ranges(total_steps)
    clocks = clock_positions(ranges, config.time_rates(train_tokens))
    rows = []
    # Shapes only (training/structure.py): a 70B-shaped plan allocates nothing.
    for index, phase, model in replay_phases(config, total_steps):
        data = resolve_data(config, phase, tau=None)
        optimizer = resolve_optimizer(config.training.optimizer, phase)
        memory = phase_memory(config, model, phase, data, optimizer, device, windows)
        clock = clocks[index]
        epochs = clock["epochs"]
        rows.append({
            "phase": phase.name,
            "t": f"{phase.start_t:.3f}-{phase.end_t:.3f}",
            "steps": "{}-{}".format(*clock["steps"]),
            "tokens": "-".join(compact(n) for n in clock["tokens"]),
            "epochs": "-" if epochs is None else "-".join(f"{float(e):.4g}" for e in epochs),
            "batch": f"{data['batch_size']}x{data['seq_len']}",
            "stacks": len(model.rack),
            "blocks": sum(len(stack) for stack in model.rack),  # depth: growth operators change it unevenly
            "objective": data["objective"],
            "params": model.num_parameters(),
            "trainable": model.num_parameters(trainable_only=True),
            "lr": lr_summary(optimizer, phase),  # a run-wide shape: its values at the phase's start and end
            "optimizer": optimizer.optimizer_type,
            "mem_GiB": gib(memory.peak(device)),
            "flops": None,  # filled below, once the final model is known (with e2e_flops)
            "e2e_flops": None,
            "time": clock,  # exact positions (not printed): steps, tokens, epochs (Fractions, or None)
            "memory": memory,
            "compute": _phase_compute(config, model, phase, data, clock, windows),
        })
    # `model` is the final one now (replay_phases changes one model in place).
    for row in rows:
        compute = row["compute"]
        compute["end_to_end"] = end_to_end_flops(model, compute["tokens"], compute["seq_len"], compute["scored"])
        row["flops"], row["e2e_flops"] = scientific(compute["flops"]), scientific(compute["end_to_end"])
    return rows


def _phase_compute(config: StackWiseConfig, model: Any, phase: Any, data: dict[str, Any], clock: dict[str, Any],
                   windows: Any) -> dict[str, Any]:
    """A phase's training FLOPs (training/flops.py), with the cache serving every draw that can
    repeat one earlier in the phase when the corpus is known (otherwise none: an upper bound)."""
    from stackwise.training.cache import cache_decision
    from stackwise.training.memory import first_trainable_stack

    first, end = clock["steps"]
    batch, seq_len = data["batch_size"], data["seq_len"]
    hits = 0
    if windows:
        decision = cache_decision(config.run.activation_cache, first_trainable_stack(model), data["objective"],
                                  data["mask_rate"], phase=phase.name, draws=(end - first) * batch,
                                  n_windows=windows(seq_len))
        hits = decision.hits if decision.on else 0
    scored = scored_fraction(data)
    flops = phase_flops(step_cost(model), steps=end - first, batch_size=batch, seq_len=seq_len, scored_fraction=scored,
                        cache_hit_rows=hits, micro_batches=config.training.grad_accum_steps)
    return {"flops": flops, "tokens": (end - first) * batch * seq_len, "seq_len": seq_len, "scored": scored,
            "cache_hit_rows": hits}


def scored_fraction(data: dict[str, Any]) -> float:
    """The expected share of positions the head scores: all for clm, the mean mask rate of a
    masked objective (a ramp's mean over the phase is the middle of its ends)."""
    if data["objective"] == "mlm":
        rate = data["mask_rate"]
        return (rate.start + rate.end) / 2 if isinstance(rate, Ramp) else rate
    if data["objective"] == "diffusion":
        return sum(data["mask_range"]) / 2
    return 1.0


def scientific(x: float) -> str:
    """A FLOP count as 1.23e15."""
    mantissa, exponent = f"{x:.2e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def flops_summary(rows: list[dict[str, Any]]) -> str:
    """The run's training FLOPs next to those of its final model trained end to end on the same tokens."""
    total = sum(row["compute"]["flops"] for row in rows)
    end_to_end = sum(row["compute"]["end_to_end"] for row in rows)
    ratio = total / end_to_end if end_to_end else float("nan")
    return (f"training FLOPs: {scientific(total)} in all; the final model trained end to end on the same tokens: "
            f"{scientific(end_to_end)} (ratio {ratio:.3f}; docs/training.md, \"Compute (FLOPs)\")")


def compact(n: int) -> str:
    """A count as a config may write it: 1280, 553K, 50M, 1.5B (4 significant digits from 10,000)."""
    if n < 10_000:
        return str(n)
    for size, suffix in ((10**12, "T"), (10**9, "B"), (10**6, "M"), (10**3, "K")):
        if n >= size:
            return f"{n / size:.4g}{suffix}"
    return str(n)


def memory_table(rows: list[dict[str, Any]], device: str) -> str:
    """Per phase, where the estimated peak goes (GiB)."""
    parts = ["weights", "gradients", "optimizer", "activations", "transients", "loss", "autocast_copies", "cache"]
    table = []
    for row in rows:
        memory = row["memory"].to_dict()
        table.append({"phase": row["phase"], **{k: gib(memory[k]) for k in parts}, "peak": gib(row["memory"].peak(device))})
    note = "cache is host RAM (counted in the CPU peak)" if device == "cpu" else "cache is host RAM (not in the GPU peak)"
    return format_table(table) + f"\n(estimated peak training memory on {device}, GiB; {note})"


def format_table(rows: list[dict[str, Any]]) -> str:
    if not rows:
        return ""
    rows = [{k: v for k, v in row.items() if k not in ("memory", "time", "compute")} for row in rows]
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
