"""A Weights & Biases logger on the callback interface (optional: `pip install 'stackwise[wandb]'`).

Config: `run.loggers: [wandb]` and `run.wandb: {project, entity, name, mode, tags, dir}`; or in
Python `TrainingMachine(config, callbacks=[WandbLogger(project="x")])`. `wandb` is imported when
a `WandbLogger` is made, never when stackwise is imported. The W&B run starts at `on_run_start`
(rank 0 only, like every callback) with the resolved config; logged windows go to `train/*`,
evaluations to `eval/*`, all charted against `step`; the run's result goes to the summary.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from stackwise.training.callbacks import Callback, RunView, plain

if TYPE_CHECKING:
    from stackwise.training.machine import TrainResult, Transition

INSTALL_HINT = "pip install 'stackwise[wandb]' (or pip install wandb)"
RUN_ID_FILE = "wandb_run_id"  # in the run directory: a resumed run continues the same W&B run


def import_wandb() -> Any:
    """The `wandb` module, or ImportError with the command that installs it."""
    try:
        import wandb
    except ImportError as err:
        raise ImportError(f"the wandb logger needs the wandb package, which is not installed: {INSTALL_HINT}") from err
    return wandb


class WandbLogger(Callback):
    """Sends the run's metrics to Weights & Biases.

    `mode`: `offline` (files only; upload later with `wandb sync DIR`), `online`, or `disabled`;
    default: the WANDB_MODE environment variable, else `offline`. `dir`: where wandb writes its
    `wandb/` folder; default: the run directory. `name`: default: the run directory's name. Other
    keyword arguments go to `wandb.init` as they are (group, notes, ...).
    """

    def __init__(
        self,
        project: str = "stackwise",
        *,
        entity: str | None = None,
        name: str | None = None,
        mode: str | None = None,
        tags: Sequence[str] = (),
        dir: str | os.PathLike[str] | None = None,  # the wandb.init name
        **init_kwargs: Any,
    ):
        self.wandb = import_wandb()
        self.project, self.entity, self.name, self.tags = project, entity, name, list(tags)
        self.mode = mode or os.environ.get("WANDB_MODE") or "offline"
        self.dir = Path(dir) if dir is not None else None
        self.init_kwargs = init_kwargs
        self.run: Any = None

    @classmethod
    def from_config(cls, settings: Mapping[str, Any]) -> WandbLogger:
        """From the `run.wandb` section (as a dict)."""
        return cls(**{k: v for k, v in settings.items() if v is not None})

    def _dir(self, run: RunView) -> Path | None:
        return self.dir if self.dir is not None else run.run_dir

    def describe(self, run: RunView) -> str:
        where = self._dir(run)
        return f"wandb {self.mode}" + (f" ({where / 'wandb'})" if where is not None else "")

    # ---- events ---------------------------------------------------------------------------

    def on_run_start(self, run: RunView) -> None:
        if self.run is not None:  # a second train() of the same machine goes on in the same W&B run
            return
        where = self._dir(run)
        if where is not None:
            where.mkdir(parents=True, exist_ok=True)
        resume: dict[str, Any] = {}
        id_file = run.run_dir / RUN_ID_FILE if run.run_dir is not None else None
        if id_file is not None and id_file.is_file():
            resume = {"id": id_file.read_text().strip(), "resume": "allow"}
        self.run = self.wandb.init(
            project=self.project, entity=self.entity, name=self.name or (run.run_dir.name if run.run_dir else None),
            mode=self.mode, dir=str(where) if where is not None else None, tags=self.tags or None,
            config=plain(run.config), **resume, **self.init_kwargs,
        )
        if id_file is not None and not resume and getattr(self.run, "id", None):
            id_file.write_text(self.run.id + "\n")
        # Every metric is charted against the run's step, so a resumed run's records line up.
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def on_log(self, run: RunView, record: Mapping[str, Any]) -> None:
        self._log("train", record, record["step"])

    def on_eval(self, run: RunView, results: Mapping[str, float]) -> None:
        self._log("eval", results, run.step)

    def on_phase_transition(self, run: RunView, transition: Transition) -> None:
        if self.run is not None:
            self.run.log({"phase/index": run.phase_index, "step": transition.step})

    def on_stop(self, run: RunView, signal: str) -> None:
        if self.run is not None:
            self.run.summary["stopped"] = signal

    def on_run_end(self, run: RunView, result: TrainResult) -> None:
        if self.run is None:
            return
        summary = result.to_dict()
        summary["transitions"] = [
            {"step": tr.step, "t": tr.t, "from": tr.from_phase, "to": tr.to_phase} for tr in result.transitions
        ]
        for key, value in summary.items():
            if value is not None and key != "run_dir":
                self.run.summary[key] = value
        self._finish(0)

    def on_exception(self, run: RunView, error: BaseException) -> None:
        self._finish(1)

    def _log(self, prefix: str, values: Mapping[str, Any], step: int) -> None:
        if self.run is None:
            return
        numbers = {f"{prefix}/{k}": v for k, v in values.items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"}
        self.run.log({**numbers, "step": step})

    def _finish(self, exit_code: int) -> None:
        if self.run is not None:
            run, self.run = self.run, None
            run.finish(exit_code=exit_code)

