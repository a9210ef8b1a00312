"""Events for user code and external loggers: `Callback`, and the read-only `RunView` it receives.

`TrainingMachine(config, callbacks=[...])` calls each callback at the moments the machine already
records (docs/events.md has the order). Every method defaults to a no-op, so a callback overrides
only what it needs. Rules:

- **No extra host syncs.** `on_step_end` gets what is already on the host; the loss is a float
  only when the machine has already moved it there (logged steps, checkpoint steps), else None.
- **Read-only.** Callbacks receive a `RunView` (a frozen snapshot: step, t, phase, config, ...),
  never the machine.
- **Errors propagate** (as in Composer). The machine finishes the step it is in (its log record,
  evaluation and checkpoint), records an `error` event, then raises the callback's exception out of
  `train_step()` / `train()`; no further callback is called for that step. The run directory
  stays consistent, so `stackwise train --resume RUN_DIR` continues from its newest checkpoint.
- **Rank 0 only.** Under torchrun only rank 0 calls callbacks (like the metrics logger).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from stackwise.config import StackWiseConfig
    from stackwise.training.logger import MetricsLogger
    from stackwise.training.machine import TrainResult, Transition


@dataclass(frozen=True)
class RunView:
    """What a callback may read about the run at the moment of an event.

    `step` is the machine's step counter: the number of steps done, which is also the index of the
    next step (in `on_step_end`, the step that just ran is `metrics["step"] == step - 1`).
    `t = step / total_steps`. `phase` is the active phase's name and `phase_index` its position in
    the schedule (the new phase in `on_phase_transition`). `config` is the resolved config as a read-only mapping
    (`plain(view.config)` gives a plain dict). `last_eval` holds the newest `val_loss`/`val_bpb`.
    """

    step: int
    t: float
    total_steps: int
    phase: str
    phase_index: int
    run_dir: Path | None
    config: Mapping[str, Any] = field(repr=False)
    tokens_seen: int
    last_eval: Mapping[str, float]


class Callback:
    """Base class of user callbacks and loggers: every method is a no-op unless overridden.

    Order in a run (docs/events.md): `on_run_start`; then per step: (`on_checkpoint` of the old
    phase's end and `on_phase_transition` when the step opens a new phase), the step's own
    `on_log`, `on_eval`, `on_checkpoint` when due, and `on_step_end` last; at the end the final
    `on_eval` / `on_checkpoint`, `on_stop` if a signal stopped the run, and `on_run_end`. If the
    run fails, `on_exception` replaces `on_run_end`.
    """

    def on_run_start(self, run: RunView) -> None:
        """Before the first step this machine runs (after construction, or after a resume)."""

    def on_step_end(self, run: RunView, metrics: Mapping[str, Any]) -> None:
        """After every step, once its log/eval/checkpoint are done. `metrics`: `step` (index of the
        step that ran), `t`, `phase`, `lr`, `tokens` (seen so far), and `loss`: a float when the
        machine already moved this step's loss to the host (logged and checkpoint steps), else
        None. Never force a device sync here: it would cost one per step."""

    def on_log(self, run: RunView, record: Mapping[str, Any]) -> None:
        """Each logged window: the fields of the `kind: step` record written to metrics.jsonl
        (step, t, phase, loss, loss_mean, lr, tokens, tokens_per_s, grad_norm, ...)."""

    def on_eval(self, run: RunView, results: Mapping[str, float]) -> None:
        """After each evaluation: `val_loss`, `val_bpb`."""

    def on_phase_transition(self, run: RunView, transition: Transition) -> None:
        """After the machine entered a new phase (`transition.step`, `.t`, `.from_phase`, `.to_phase`);
        `run.phase` is the new phase."""

    def on_checkpoint(self, run: RunView, path: Path) -> None:
        """After a checkpoint landed on disk at `path`."""

    def on_stop(self, run: RunView, signal: str) -> None:
        """A signal (SIGTERM, SIGINT) stopped the run early; its checkpoint is already written.
        `on_run_end` follows, with `result.stopped` set."""

    def on_run_end(self, run: RunView, result: TrainResult) -> None:
        """`train()` finished (to t = 1, or stopped by a signal) and returns `result`."""

    def on_exception(self, run: RunView, error: BaseException) -> None:
        """`train()` is failing with `error` (raised again afterwards); a logger closes here.
        An exception raised by this method is reported and otherwise ignored."""

    def describe(self, run: RunView) -> str | None:
        """A logger names itself for the `loggers:` line printed at run start (None: not a logger)."""
        return None


class Events:
    """The machine's side of the callbacks: calls them in order and keeps the first exception one
    raises until the step is complete (`raise_pending`), so the run directory stays consistent.

    `view()` makes the RunView of the moment; `log` records errors and says the `loggers:` line."""

    def __init__(self, callbacks: Sequence[Callback], view: Callable[[], RunView], log: Callable[[], MetricsLogger]):
        self.callbacks = list(callbacks)
        self._view, self._log = view, log
        self._started = False
        self._error: Exception | None = None

    def begin(self) -> None:
        """Once per machine, before its first step: say which loggers are active, then `on_run_start`."""
        if self._started:
            return
        self._started = True
        view = self._view()
        log = self._log()
        log.say(log.describe([d for d in (cb.describe(view) for cb in self.callbacks) if d]))
        self.emit("on_run_start")

    def emit(self, event: str, *args: Any) -> None:
        """Call `event` on every callback. The first exception is kept and recorded; no callback
        hears more until `raise_pending` has raised it."""
        if not self.callbacks or self._error is not None:
            return
        if event != "on_run_start" and not self._started:
            self.begin()  # e.g. evaluate() before the first step: on_run_start comes first
        view = self._view()
        for callback in self.callbacks:
            try:
                getattr(callback, event)(view, *args)
            except Exception as err:
                where = f"callback {type(callback).__name__}.{event} failed after {view.step} steps"
                if hasattr(err, "add_note"):  # Python 3.11+
                    done = "" if event == "on_run_start" else "the step in progress was completed; "
                    err.add_note(f"{where}; {done}the run can be resumed from its newest checkpoint, if it has one")
                self._log().record("error", step=view.step, message=f"{where}: {type(err).__name__}: {err}")
                self._error = err
                return

    def raise_pending(self) -> None:
        err, self._error = self._error, None
        if err is not None:
            raise err

    def exception(self, error: BaseException) -> None:
        """`train()` is failing: tell every callback (a logger closes its run); their own errors are
        reported and dropped so the original error is the one raised."""
        self._error = None
        if not self.callbacks:
            return
        view = self._view()
        for callback in self.callbacks:
            try:
                callback.on_exception(view, error)
            except Exception as err:  # the run's own error matters more
                self._log().say(f"callback {type(callback).__name__}.on_exception failed: {type(err).__name__}: {err}")


def build_callbacks(config: StackWiseConfig, given: Sequence[Callback], is_main: bool,
                    config_loggers: bool = True) -> list[Callback]:
    """The user's callbacks plus the loggers named in `run.loggers`; only rank 0 calls callbacks.
    A missing optional package is a config error, raised before the run directory is made."""
    from stackwise.config import ConfigError

    callbacks = list(given)
    for i, name in enumerate(config.run.loggers if config_loggers else []):
        if name == "wandb":
            from stackwise.training.wandb_logger import INSTALL_HINT, WandbLogger

            try:
                callbacks.append(WandbLogger.from_config(config.run.wandb.model_dump()))
            except ImportError:
                raise ConfigError([(f"run.loggers.{i}", f"the wandb logger needs the wandb package: {INSTALL_HINT}",
                                    name)]) from None
    for callback in callbacks:
        if not isinstance(callback, Callback):
            raise TypeError(f"callbacks must be stackwise.training.Callback objects, got {type(callback).__name__}")
    return callbacks if is_main else []


def frozen(value: Any) -> Any:
    """A deep read-only copy: mappings become mappingproxies, lists become tuples."""
    if isinstance(value, Mapping):
        return MappingProxyType({k: frozen(v) for k, v in value.items()})
    if isinstance(value, (list, tuple)):
        return tuple(frozen(v) for v in value)
    return value


def plain(value: Any) -> Any:
    """The reverse of `frozen`: plain dicts and lists (e.g. to hand `run.config` to a logger)."""
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    return value
