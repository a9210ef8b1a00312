"""`stackwise plot`: train / validation loss against t, steps, tokens, FLOPs or wall-clock time,
with phase bands and transitions drawn in the same units.

Every axis comes from metrics.jsonl: `t` and `step` from each record, `tokens` and `flops`
(cumulative, training/flops.py) from the step records, `time` from their `wall_s` (the run's own
training clock, which a resume carries on; runs logged before it existed fall back to the
records' timestamps). A phase boundary at step s is drawn where the run stood after s steps.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stackwise.cli.outputs import output_folder_problem
from stackwise.config import StackWiseConfig
from stackwise.training.logger import read_metrics

# --x: the record field each axis reads and its label.
AXES = {
    "t": ("t", "normalized time t"),
    "step": ("step", "step"),
    "tokens": ("tokens", "tokens seen"),
    "flops": ("flops", "training FLOPs"),
    "time": ("wall_s", "training wall-clock time (s)"),
}


class PlotError(ValueError):
    pass


@dataclass
class PlotData:
    """What `plot_run` draws, in the units of one axis."""

    x_label: str
    train: tuple[list[float], list[float]]  # (x, loss_mean) of the step records
    val: tuple[list[float], list[float]]  # (x, val_loss) of the eval records
    bands: list[tuple[str, float, float]]  # (phase, start, end)
    transitions: list[tuple[str, float]]  # (to phase, x)
    x_range: tuple[float, float]
    title_suffix: str = ""


def check_plot_path(out: Path) -> None:
    """Refuse, before drawing, an output path matplotlib cannot write: a suffix that names no
    image format it knows, a missing folder, a folder or a read-only place."""

    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = out.suffix.lower().lstrip(".")
    if suffix not in formats:
        known = ", ".join(f".{f}" for f in sorted(formats))
        raise PlotError(f"--out {out}: {f'.{suffix}' if suffix else 'no suffix'} is not an image format; use one of {known}")
    if out.is_dir():
        raise PlotError(f"--out {out}: is a folder; give a file name such as {out / 'loss.png'}")
    problem = output_folder_problem(out)
    if problem:
        raise PlotError(f"--out {out}: {problem}")


def plot_data(run_dir: str | Path, x: str = "t") -> PlotData:
    """The series, bands and transitions of a run's loss plot against axis `x` (see AXES)."""
    run_dir = Path(run_dir)
    if x not in AXES:
        raise PlotError(f"--x {x}: choose one of {', '.join(AXES)}")
    records = read_metrics(run_dir)
    steps = [r for r in records if r.get("kind") == "step"]
    if not steps:
        raise PlotError(f"{run_dir / 'metrics.jsonl'}: no logged steps to plot")
    position = _axis(run_dir, steps, x)
    evals = [r for r in records if r.get("kind") == "eval"]
    transitions = [r for r in records if r.get("kind") == "transition"]
    if x in ("t", "step"):  # the run's own clock: a step's loss sits where the step starts
        train_x, val_x = [r[x] for r in steps], [r[x] for r in evals]
        moves = [(tr["to"], tr[x]) for tr in transitions]
        x_range = (0.0, 1.0 if x == "t" else float(_total_steps(run_dir, steps)))
    else:
        train_x = [position(r["step"] + 1, r) for r in steps]  # where the run stood after the step
        val_x = [position(r["step"], r) for r in evals]  # an eval's step counts the steps done
        moves = [(tr["to"], position(tr["step"], None)) for tr in transitions]
        x_range = (0.0, max(train_x))
    title = f" — final val {evals[-1]['val_bpb']:.3f} bits/byte" if evals and "val_bpb" in evals[-1] else ""
    return PlotData(AXES[x][1], (train_x, [r["loss_mean"] for r in steps]), (val_x, [r["val_loss"] for r in evals]),
                    _phase_bands(run_dir, x, position), moves, x_range, title)


def _pyplot() -> Any:
    """matplotlib, imported when something is drawn: not at every command's start (its import is
    slow, and its style parsing swallows a Ctrl-C that lands in it)."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display is needed or assumed
    import matplotlib.pyplot as plt

    return plt


def plot_run(run_dir: str | Path, out: str | Path | None = None, x: str = "t") -> Path:
    run_dir = Path(run_dir)
    if out is not None:
        check_plot_path(Path(out))
    data = plot_data(run_dir, x)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=120)
    for i, (name, start, end) in enumerate(data.bands):
        ax.axvspan(start, end, color=f"C{i % 10}", alpha=0.08, lw=0)
        ax.text((start + end) / 2, 0.02, name, transform=ax.get_xaxis_transform(), ha="center", fontsize=8, alpha=0.8)
    ax.plot(*data.train, label="train loss", color="tab:blue", lw=1.2)
    if data.val[0]:
        ax.plot(*data.val, "o-", label="validation loss", color="tab:orange", ms=3)
    for name, at in data.transitions:
        ax.axvline(at, color="black", ls="--", lw=0.8)
        ax.annotate(f"→ {name}", (at, 1.0), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=7)
    ax.set_xlim(*data.x_range)
    ax.set_xlabel(data.x_label)
    ax.set_ylabel("loss (nats per target token)")
    ax.set_title(run_dir.name + data.title_suffix)
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    out = Path(out) if out else run_dir / "loss.png"
    fig.tight_layout()
    try:
        fig.savefig(out)
    except OSError as err:
        raise PlotError(f"{out}: cannot write the plot: {err.strerror or err}") from None
    finally:
        plt.close(fig)
    return out


def _axis(run_dir: Path, steps: list[dict[str, Any]], x: str) -> Any:
    """position(steps_done, record) on axis `x`: the record's own value when it has one, else the
    value the step records give at that many steps done (linear between logged steps)."""
    field = AXES[x][0]
    if x in ("t", "step"):  # bands only (the records carry both): t is drawn as it is
        return lambda done, record: float(done)
    if x == "time" and not all("wall_s" in r for r in steps):
        field = "elapsed_s"  # runs logged before wall_s: seconds since the first step record
        for r in steps:
            r["elapsed_s"] = r["time"] - steps[0]["time"]
    if not all(field in r for r in steps):
        raise PlotError(f"{run_dir / 'metrics.jsonl'}: the step records carry no `{field}` (logged before stackwise "
                        f"counted it); plot this run with --x {', '.join(a for a in AXES if a != x)}")
    done = np.array([0.0] + [r["step"] + 1 for r in steps])
    values = np.array([0.0] + [float(r[field]) for r in steps])

    def position(steps_done: float, record: dict[str, Any] | None) -> float:
        if record is not None and field in record:
            return float(record[field])
        return float(np.interp(steps_done, done, values))

    return position


def _total_steps(run_dir: Path, steps: list[dict[str, Any]]) -> int:
    """The run's length (config.yaml's; the steps logged when it is missing)."""
    config_path = run_dir / "config.yaml"
    total = StackWiseConfig.from_yaml(config_path).training.total_steps if config_path.exists() else None
    return total or steps[-1]["step"] + 1


def _phase_bands(run_dir: Path, x: str, position: Any) -> list[tuple[str, float, float]]:
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        return []
    config = StackWiseConfig.from_yaml(config_path)
    total = config.training.total_steps
    bands = []
    for phase in config.schedule or []:
        bounds = phase.bounds_t(total)
        if bounds is None:
            continue
        if x != "t":  # the boundary steps, placed where the run stood after that many steps
            bounds = tuple(position(round(b * total), None) for b in bounds)
        bands.append((phase.name, *bounds))
    return bands
