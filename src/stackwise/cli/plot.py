"""`stackwise plot`: train / validation loss against t, with phase bands and transitions."""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display is needed or assumed
import matplotlib.pyplot as plt

from stackwise.cli.outputs import output_folder_problem
from stackwise.config import StackWiseConfig
from stackwise.training.logger import read_metrics


class PlotError(ValueError):
    pass


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


def plot_run(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    if out is not None:
        check_plot_path(Path(out))
    records = read_metrics(run_dir)
    steps = [r for r in records if r.get("kind") == "step"]
    if not steps:
        raise PlotError(f"{run_dir / 'metrics.jsonl'}: no logged steps to plot")
    evals = [r for r in records if r.get("kind") == "eval"]
    transitions = [r for r in records if r.get("kind") == "transition"]
    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=120)
    _phase_bands(ax, run_dir)
    ax.plot([r["t"] for r in steps], [r["loss_mean"] for r in steps], label="train loss", color="tab:blue", lw=1.2)
    if evals:
        ax.plot([r["t"] for r in evals], [r["val_loss"] for r in evals], "o-", label="validation loss", color="tab:orange", ms=3)
    for tr in transitions:
        ax.axvline(tr["t"], color="black", ls="--", lw=0.8)
        ax.annotate(f"→ {tr['to']}", (tr["t"], 1.0), xycoords=("data", "axes fraction"), rotation=90,
                    va="top", ha="right", fontsize=7)
    ax.set_xlim(0, 1)
    ax.set_xlabel("normalized time t")
    ax.set_ylabel("loss (nats per target token)")
    title = run_dir.name
    if evals and "val_bpb" in evals[-1]:
        title += f" — final val {evals[-1]['val_bpb']:.3f} bits/byte"
    ax.set_title(title)
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


def _phase_bands(ax: plt.Axes, run_dir: Path) -> None:
    config_path = run_dir / "config.yaml"
    if not config_path.exists():
        return
    config = StackWiseConfig.from_yaml(config_path)
    for i, phase in enumerate(config.schedule or []):
        bounds = phase.bounds_t(config.training.total_steps)
        if bounds is None:
            continue
        ax.axvspan(*bounds, color=f"C{i % 10}", alpha=0.08, lw=0)
        ax.text((bounds[0] + bounds[1]) / 2, 0.02, phase.name, transform=ax.get_xaxis_transform(), ha="center", fontsize=8, alpha=0.8)
