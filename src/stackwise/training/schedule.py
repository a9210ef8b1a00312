"""Time and phases: `TimeController`, `Phase`, `PhaseSchedule`, and per-phase settings resolution.

The rules (DESIGN.md section 4, docs/schedule.md):

- step k (0-based) of an N-step run runs at t = k / N; the run ends at t = 1 (step N never runs);
- a phase holds [start_t, end_t); t = 1.0 belongs to the last phase;
- the first step of a phase is `step_at(start_t)` = ceil(start_t · N), so the phase of step k is
  the phase whose [start_t, end_t) holds k / N, computed with integers to avoid float noise;
- inside a phase, local time τ = (t − start_t) / (end_t − start_t) drives ramped settings;
  an lr shaped `over: run` is read at t instead, one shape over the whole run (`phase_lr`);
- phases on the same corpus and seq_len continue one window order (`data_orders`);
- a run length or phase bounds in tokens or epochs are converted to steps once, before the
  schedule is built (`resolve_time`, stackwise/time_units.py); t stays the one clock.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from pydantic import ValidationError

from stackwise import time_units
from stackwise.config import (
    _NO_VALUE,
    ConfigError,
    LrSchedule,
    OptimizerConfig,
    PhaseConfig,
    PhaseDataConfig,
    PhaseModelConfig,
    PhaseOptimizerConfig,
    StackWiseConfig,
    _problems_from,
    _schedule_problems,
    check_schedule,
    value_at,
)
from stackwise.time_units import step_at

_STEP_DECIMALS = time_units.STEP_DECIMALS
# Boundaries closer than this are the same boundary (the tolerance config._schedule_problems uses).
_EPS = time_units.T_EPS

Problem = tuple[str, str, Any]

# --------------------------------------------------------------------------------------------
# Time


class TimeController:
    """Counts steps and maps them to normalized time t = step / total_steps."""

    def __init__(self, total_steps: int, step: int = 0):
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ValueError(f"total_steps must be a positive integer, got {total_steps!r}")
        self.total_steps = total_steps
        self._step = self._checked_step(step)

    def _checked_step(self, step: int) -> int:
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= self.total_steps:
            raise ValueError(f"step must be an integer in [0, {self.total_steps}], got {step!r}")
        return step

    @property
    def t(self) -> _Time:
        """The current time, a float; also callable: `t(k)` is step k's time k / total_steps."""
        return _Time(self._step / self.total_steps, self)

    def time_of(self, step: int | None = None) -> float:
        """Time of `step` (default: the current step): step k runs at t = k / total_steps."""
        k = self._step if step is None else self._checked_step(step)
        return k / self.total_steps

    def step_at(self, t: float) -> int:
        """The first step that runs at a time ≥ t (so a phase starting at t begins on this step)."""
        if not 0.0 <= t <= 1.0:
            raise ValueError(f"t must lie in [0, 1], got {t!r}")
        return step_at(t, self.total_steps)

    def advance(self) -> int:
        """Count one finished step; returns the new current step."""
        if self.done:
            raise RuntimeError(f"the run is over: all {self.total_steps} steps have run")
        self._step += 1
        return self._step

    @property
    def step(self) -> int:
        """The next step to run (equivalently, how many steps have finished)."""
        return self._step

    @property
    def remaining(self) -> int:
        return self.total_steps - self._step

    @property
    def done(self) -> bool:
        return self._step >= self.total_steps

    def state_dict(self) -> dict[str, int]:
        return {"step": self._step, "total_steps": self.total_steps}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        # A different run length would move every phase boundary: the resumed run would not be
        # the same run, so refuse rather than silently change the timeline.
        if state["total_steps"] != self.total_steps:
            raise ValueError(
                f"checkpoint was made for total_steps={state['total_steps']}, this run has {self.total_steps}"
            )
        self._step = self._checked_step(state["step"])

    def __repr__(self) -> str:
        return f"TimeController(total_steps={self.total_steps}, step={self._step})"


class _Time(float):
    """A float (the current t) that can also be called as t(step): the design names both
    `TimeController.t(step)` and a readable current `t`, and this serves both spellings."""

    def __new__(cls, value: float, controller: TimeController) -> _Time:
        out = super().__new__(cls, value)
        out._controller = controller
        return out

    def __call__(self, step: int | None = None) -> float:
        return self._controller.time_of(step)

    def __reduce__(self) -> tuple[type, tuple[float]]:
        # Pickle/deepcopy as a plain float: the controller link is only for calling.
        return (float, (float(self),))


# --------------------------------------------------------------------------------------------
# Phases


def _as_section(cls: type, value: Any, path: str) -> Any:
    """Accept a config section object or a plain dict for it (as read back from JSON/YAML)."""
    if isinstance(value, cls):
        return value
    if value is None:
        return cls()
    if isinstance(value, Mapping):
        try:
            return cls.model_validate(dict(value))
        except ValidationError as err:
            # The config's own formatting, so paths read `data.seq_len` as they do in config errors.
            raise ConfigError([(f"{path}.{p}", m, v) for p, m, v in _problems_from(err)]) from None
    raise ConfigError([(path, f"expected a mapping or {cls.__name__}", value)])


@dataclass(frozen=True)
class Phase:
    """A time interval [start_t, end_t) of the run with its per-plane settings."""

    name: str
    start_t: float
    end_t: float
    task: str | None = None
    data: PhaseDataConfig = field(default_factory=PhaseDataConfig)
    model: PhaseModelConfig = field(default_factory=PhaseModelConfig)
    optimizer: PhaseOptimizerConfig = field(default_factory=PhaseOptimizerConfig)

    def __post_init__(self) -> None:
        # Frozen: sections given as dicts are converted with object.__setattr__.
        for attr, cls in (
            ("data", PhaseDataConfig),
            ("model", PhaseModelConfig),
            ("optimizer", PhaseOptimizerConfig),
        ):
            object.__setattr__(self, attr, _as_section(cls, getattr(self, attr), attr))
        problems = self.problems()
        if problems:
            raise ConfigError(problems)

    def problems(self) -> list[Problem]:
        """Checks that concern this phase alone (paths relative to the phase)."""
        out: list[Problem] = []
        if not isinstance(self.name, str) or not self.name:
            out.append(("name", "must be a non-empty string", self.name))
        for key in ("start_t", "end_t"):
            value = getattr(self, key)
            if not _is_number(value) or not 0.0 <= value <= 1.0:
                out.append((key, "must be a number in [0, 1]", value))
        if _is_number(self.start_t) and _is_number(self.end_t) and self.start_t >= self.end_t:
            out.append(("end_t", f"must be greater than start_t={self.start_t}", self.end_t))
        if self.task not in (None, "clm", "mlm", "diffusion"):
            out.append(("task", "must be one of 'clm', 'mlm', 'diffusion'", self.task))
        elif self.task and self.data.objective and self.task != self.data.objective:
            out.append(("task", f"contradicts data_config.objective={self.data.objective!r}", self.task))
        return out

    @classmethod
    def from_config(cls, phase: PhaseConfig, total_steps: int | None = None) -> Phase:
        """Build from a config phase; a step-defined phase needs the run's total steps."""
        bounds = phase.bounds_t(total_steps)
        if bounds is None:
            needs = "the run length" if phase.time_unit == "step" else "the whole schedule (StackWiseConfig.in_steps)"
            raise ConfigError(
                [
                    (
                        "training.total_steps",
                        f"phase {phase.name!r} is given in {phase.time_unit}s; converting it needs {needs}",
                        None,
                    )
                ]
            )
        return cls(
            name=phase.name,
            start_t=bounds[0],
            end_t=bounds[1],
            task=phase.task,
            # Deep copies: later edits to the config must not change a running schedule.
            data=phase.data_config.model_copy(deep=True),
            model=phase.model_config_.model_copy(deep=True),
            optimizer=phase.optimizer_config.model_copy(deep=True),
        )

    @property
    def duration(self) -> float:
        return self.end_t - self.start_t

    def local_time(self, t: float) -> float:
        """τ = (t − start_t) / (end_t − start_t): 0 at the phase's start, 1 at its end."""
        return (t - self.start_t) / (self.end_t - self.start_t)

    def contains(self, t: float) -> bool:
        """Whether t lies in [start_t, end_t) (the last phase's t = 1 is handled by the schedule)."""
        return self.start_t <= t < self.end_t

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "start_t": self.start_t,
            "end_t": self.end_t,
            "task": self.task,
            "data": self.data.model_dump(mode="json"),
            "model": self.model.model_dump(mode="json"),
            "optimizer": self.optimizer.model_dump(mode="json"),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Phase:
        known = {"name", "start_t", "end_t", "task", "data", "model", "optimizer"}
        problems: list[Problem] = [(k, "unknown field", data[k]) for k in data if k not in known]
        problems += [(k, "is required", None) for k in ("name", "start_t", "end_t") if k not in data]
        if problems:
            raise ConfigError(problems)
        return cls(**dict(data))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def schedule_problems(phases: Sequence[Phase]) -> list[Problem]:
    """Tiling problems of a phase list (gap, overlap, not starting at 0 or ending at 1, names).

    Public wrapper over the config's own check so both speak with one voice: the phases are
    presented to it as t-form config phases (built without re-validating each one).
    """
    as_config = [PhaseConfig.model_construct(name=p.name, start_t=p.start_t, end_t=p.end_t) for p in phases]
    return _schedule_problems(as_config, None)


class PhaseSchedule:
    """Phases that tile [0, 1] with no gap and no overlap, in time order."""

    def __init__(self, phases: Sequence[Phase]):
        phases = list(phases)
        problems = _list_problems(phases)
        if problems:
            raise ConfigError(problems)
        self._phases = tuple(_snap(phases))
        self._starts = [p.start_t for p in self._phases]

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: StackWiseConfig, total_steps: int) -> PhaseSchedule:
        """The config's schedule for a run of `total_steps` steps (one phase if it has none).
        Bounds in tokens are converted here (`in_steps`); epochs need the config converted with
        the corpus first (`resolve_time`)."""
        if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
            raise ConfigError([("training.total_steps", "must be a positive integer", total_steps)])
        if config.uses_time_units():
            config = config.in_steps(total_steps)
        if config.schedule is None:
            schedule = cls.single_phase()
        else:
            check_schedule(config, total_steps)  # step-defined phases are only checkable now
            schedule = cls([Phase.from_config(p, total_steps) for p in config.schedule])
        schedule.check_steps(total_steps)
        return schedule

    @classmethod
    def single_phase(cls, name: str = "main", **settings: Any) -> PhaseSchedule:
        """One phase over the whole run; `settings` are Phase fields (task, data, model, optimizer)."""
        return cls([Phase(name=name, start_t=0.0, end_t=1.0, **settings)])

    # ---- lookup -------------------------------------------------------------------------

    @property
    def phases(self) -> tuple[Phase, ...]:
        return self._phases

    @property
    def names(self) -> list[str]:
        return [p.name for p in self._phases]

    def __len__(self) -> int:
        return len(self._phases)

    def __iter__(self) -> Iterator[Phase]:
        return iter(self._phases)

    def __getitem__(self, index: int) -> Phase:
        return self._phases[index]

    def index_at(self, t: float) -> int:
        """Index of the phase whose [start_t, end_t) holds t; t = 1.0 gives the last phase."""
        if not _is_number(t) or not 0.0 <= t <= 1.0:
            raise ValueError(f"t must lie in [0, 1], got {t!r}")
        # bisect_right: a t exactly on a boundary belongs to the phase that starts there.
        return bisect.bisect_right(self._starts, t) - 1

    def at(self, t: float) -> Phase:
        return self._phases[self.index_at(t)]

    def index_at_step(self, step: int, total_steps: int) -> int:
        """Index of the phase that runs step k: the one whose step range holds k.

        Same answer as index_at(k / N), but decided on integers so that it always agrees with
        `transition_steps` and `step_ranges` even when a boundary sits within float noise of k / N.
        """
        if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= total_steps:
            raise ValueError(f"step must be an integer in [0, {total_steps}], got {step!r}")
        firsts = [step_at(p.start_t, total_steps) for p in self._phases]
        return max(bisect.bisect_right(firsts, step) - 1, 0)

    def phase_at_step(self, step: int, total_steps: int) -> Phase:
        return self._phases[self.index_at_step(step, total_steps)]

    # ---- boundaries ---------------------------------------------------------------------

    @property
    def transitions(self) -> list[tuple[float, str, str]]:
        """(boundary t, from phase, to phase) for each boundary inside the run."""
        return [(b.start_t, a.name, b.name) for a, b in itertools.pairwise(self._phases)]

    def transition_steps(self, total_steps: int) -> list[tuple[int, float, str, str]]:
        """(first step of the new phase, that step's t, from, to): when the machine switches phases.

        The t is the step's own time k / N, which is ≥ the boundary (equal when it falls on a step).
        """
        out = []
        for t, before, after in self.transitions:
            k = step_at(t, total_steps)
            out.append((k, k / total_steps, before, after))
        return out

    def step_ranges(self, total_steps: int) -> list[tuple[int, int]]:
        """Each phase's steps as [first_step, end_step); together they cover 0 … N−1 once."""
        return [(step_at(p.start_t, total_steps), step_at(p.end_t, total_steps)) for p in self._phases]

    def check_steps(self, total_steps: int) -> None:
        """Raise ConfigError for each phase that would run no step in a run of `total_steps`."""
        problems = []
        for i, (phase, (first, end)) in enumerate(
            zip(self._phases, self.step_ranges(total_steps), strict=True)
        ):
            if end <= first:
                # Any run with N ≥ 1 / duration steps gives every phase of that width a step.
                need = math.ceil(round(1.0 / phase.duration, _STEP_DECIMALS))
                problems.append(
                    (
                        f"schedule.{i}.end_t",
                        f"phase {phase.name!r} [t={phase.start_t:g}, {phase.end_t:g}) gets no step of the "
                        f"{total_steps} total steps; it needs total_steps >= {need} (or a longer phase)",
                        phase.end_t,
                    )
                )
        if problems:
            raise ConfigError(problems)

    # ---- export -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {"phases": [p.to_dict() for p in self._phases]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PhaseSchedule:
        if not isinstance(data, Mapping) or not isinstance(data.get("phases"), list):
            raise ConfigError([("phases", "expected a mapping with a 'phases' list", data)])
        phases, problems = [], []
        for i, item in enumerate(data["phases"]):
            try:
                phases.append(Phase.from_dict(item))
            except ConfigError as err:
                problems += [(f"schedule.{i}.{p}", m, v) for p, m, v in err.problems]
        if problems:
            raise ConfigError(problems)
        return cls(phases)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, PhaseSchedule) and self._phases == other._phases

    __hash__ = None  # type: ignore[assignment]  # mutable settings inside: not hashable

    def __repr__(self) -> str:
        parts = ", ".join(f"{p.name}[{p.start_t:g}, {p.end_t:g})" for p in self._phases)
        return f"PhaseSchedule({parts})"


def _list_problems(phases: list[Phase]) -> list[Problem]:
    if not phases:
        return [("schedule", "needs at least one phase", phases)]
    problems: list[Problem] = []
    for i, p in enumerate(phases):
        if not isinstance(p, Phase):
            problems.append((f"schedule.{i}", "expected a Phase", p))
    if problems:
        return problems
    starts = [p.start_t for p in phases]
    for i in range(1, len(phases)):
        if starts[i] < starts[i - 1]:
            problems.append(
                (
                    f"schedule.{i}.start_t",
                    f"phases must be listed in time order (previous starts at t={starts[i - 1]:g})",
                    starts[i],
                )
            )
    return problems + schedule_problems(phases)


def _snap(phases: list[Phase]) -> list[Phase]:
    """Make boundaries that agree within float noise identical, so [0, 1] is tiled exactly."""
    out = []
    for i, p in enumerate(phases):
        start = 0.0 if i == 0 else out[-1].end_t
        end = 1.0 if i == len(phases) - 1 else p.end_t
        out.append(p if (p.start_t, p.end_t) == (start, end) else replace(p, start_t=start, end_t=end))
    return out


# --------------------------------------------------------------------------------------------
# Time in tokens and epochs: converted once, before anything depends on the run length


def resolve_time(config: StackWiseConfig, total_steps: int | None = None, data: Any = None) -> StackWiseConfig:
    """`config.in_steps(total_steps, ...)`, with the training split counted when epochs need it:
    from `data` (a ProgressiveDataLoader, or any source with an int `n_train_tokens`) or, without
    it, from a loader built on the config (tokenized once; the token cache serves the next)."""
    keys = config.epoch_keys(total_steps)
    if not keys:
        return config.in_steps(total_steps)
    if data is None:
        from stackwise.training.loader import ProgressiveDataLoader  # the loader imports this module

        data = ProgressiveDataLoader(config)
    return config.in_steps(total_steps, train_token_counter(data, keys))


def train_token_counter(source: Any, keys: Sequence[str] = ("training.total_epochs",)) -> Any:
    """The training split's token count of `source`, as `StackWiseConfig.time_rates` takes it:
    per phase corpus for a ProgressiveDataLoader, else its `n_train_tokens`. Raises ConfigError
    naming `keys` (the fields in epochs) when the source cannot say."""
    from stackwise.training.loader import ProgressiveDataLoader  # the loader imports this module

    if isinstance(source, ProgressiveDataLoader):  # each phase's own corpus (the loader has read them all)
        return lambda paths, text_field: len(source._stream(tuple(paths), text_field).train)
    count = getattr(source, "n_train_tokens", None)
    if isinstance(count, int) and not isinstance(count, bool):
        return count
    raise ConfigError([(key, "is in epochs, which count passes over the training split, and this data source does "
                             "not say how many tokens it holds (no n_train_tokens); give the time in steps or tokens",
                        _NO_VALUE) for key in keys])


# --------------------------------------------------------------------------------------------
# Settings of a phase (the machine calls these at the phase's start; ramps again as τ moves)


def lr_at(lr: float | LrSchedule, tau: float) -> float:
    """Base learning rate at local time τ: a number is constant; an LrSchedule warms up linearly
    to `peak` over its first `warmup` fraction, then holds (constant) or decays linearly or by a
    half cosine to `final` at τ = 1 (see docs/schedule.md for the formulas)."""
    return value_at(lr, tau)


def runs_over_run(lr: float | LrSchedule) -> bool:
    """Whether `lr` is one shape over the whole run (`over: run`), read at the run's t."""
    return isinstance(lr, LrSchedule) and lr.over == "run"


def phase_lr(cfg: OptimizerConfig, phase: Phase, t: float) -> float:
    """The base lr at run time t inside `phase`, for `cfg = resolve_optimizer(base, phase)`: a
    shape `over: run` read at t, any other lr at the phase's local time τ; times `lr_multiplier`.
    A pure function of the step (t = step / N), so a resumed run sets the same lr."""
    time = t if runs_over_run(cfg.lr) else phase.local_time(t)
    return value_at(cfg.lr, time) * cfg.lr_multiplier


def new_params_warmup(cfg: OptimizerConfig, phase: Phase, t: float) -> float:
    """The factor on the lr of the parameters `phase` adds (its grown stacks) at time t:
    `min(1, τ / warmup_new)`, linear from 0; 1 without `warmup_new`."""
    if cfg.warmup_new <= 0:
        return 1.0
    return min(max(phase.local_time(t), 0.0) / cfg.warmup_new, 1.0)


def lr_summary(cfg: OptimizerConfig, phase: Phase) -> str:
    """The lr of a phase in words, for `stackwise plan`: a shape of the phase as written (`warmup
    5% → cosine 3.0e-04→3.0e-05`); a run-wide shape by the values it gives at the phase's start
    and end (`2.0e-03→1.1e-03 (run cosine)`); then any multiplier and new-parameter warmup."""
    lr = cfg.lr
    if runs_over_run(lr):
        start, end = phase_lr(cfg, phase, phase.start_t), phase_lr(cfg, phase, phase.end_t)
        scaled = f" ×{cfg.lr_multiplier:g}" if cfg.lr_multiplier != 1.0 else ""
        text = f"{start:.1e}→{end:.1e} (run {lr.schedule}{scaled})"
    else:
        if isinstance(lr, LrSchedule):
            warm = f"warmup {lr.warmup:.0%} → " if lr.warmup else ""
            text = f"{warm}{lr.schedule} {lr.peak:.1e}→{lr.final:.1e}" if lr.schedule != "constant" else f"{warm}{lr.peak:.1e}"
        else:
            text = f"{lr:.1e}"
        text += f" ×{cfg.lr_multiplier:g}" if cfg.lr_multiplier != 1.0 else ""
    return text + (f"; new params warm up {cfg.warmup_new:.0%}" if cfg.warmup_new else "")


def resolve_optimizer(base: OptimizerConfig, phase: Phase) -> OptimizerConfig:
    """The phase's optimizer settings: each override that is not None replaces the base field
    (whole values: a phase's `lr_scale` replaces the base mapping, it is not merged)."""
    overrides = {k: v for k, v in phase.optimizer if v is not None}
    # Validate the merged result: an override may be fine alone but not with the base. (Both
    # levels share their field types, so a valid override of a valid base passes; a phase built
    # by hand with bad values gets a ConfigError naming it, not pydantic's raw error.)
    try:
        return OptimizerConfig.model_validate({**base.model_dump(), **overrides})
    except ValidationError as err:
        raise ConfigError([(f"phase {phase.name!r}: optimizer_config.{p}", m, v) for p, m, v in _problems_from(err)]) from None


def resolve_data(config: StackWiseConfig, phase: Phase, tau: float | None = 0.0) -> dict[str, Any]:
    """The phase's data settings, with phase overrides over the run's; ramps evaluated at τ.

    With tau=None a ramped `mask_rate` is returned as the Ramp itself, for a loader that
    evaluates it per step.
    """
    return data_settings(config, phase.data, phase.task, tau)


def data_settings(
    config: StackWiseConfig, over: PhaseDataConfig, task: str | None = None, tau: float | None = 0.0
) -> dict[str, Any]:
    """`resolve_data` from a phase's data overrides and task alone (a config phase whose bounds
    are not known yet, e.g. step-defined before the run length is)."""
    base = config.data

    def pick(name: str, default: Any) -> Any:
        value = getattr(over, name)
        return default if value is None else value

    mask_rate = pick("mask_rate", base.mask_rate)
    return {
        "objective": task or over.objective or base.objective,
        "seq_len": pick("seq_len", config.training.seq_len),
        "batch_size": pick("batch_size", config.training.batch_size),
        "mask_rate": mask_rate if tau is None else value_at(mask_rate, tau),
        "mask_range": tuple(pick("mask_range", base.mask_range)),
        "paths": list(pick("paths", base.paths)),
        "text_field": pick("text_field", base.text_field),
    }


def data_orders(config: StackWiseConfig, total_steps: int) -> list[tuple[int, int]]:
    """Per phase, `(order, order_offset)`: which window order the phase draws from and how many
    samples of that order the earlier phases drew (docs/data.md, "Data order across phases").

    Phases on the same corpus (paths, text_field) at the same seq_len cut the same windows, so
    they continue one order: the order of the first such phase (its index names it), with a
    run-wide sample counter that counts every earlier such phase's steps × its batch size. A
    phase on another corpus or seq_len starts its own order at 0. A pure function of the config
    and the run length, so resume and every rank agree on it."""
    schedule = PhaseSchedule.from_config(config, total_steps)
    first_of: dict[tuple[Any, ...], int] = {}  # corpus key -> index of the first phase on it
    drawn: dict[tuple[Any, ...], int] = {}  # corpus key -> samples drawn so far
    out = []
    for index, (phase, (first, end)) in enumerate(zip(schedule, schedule.step_ranges(total_steps), strict=True)):
        data = resolve_data(config, phase, tau=None)
        key = (tuple(data["paths"]), data["text_field"], data["seq_len"])
        order = first_of.setdefault(key, index)
        out.append((order, drawn.get(key, 0)))
        drawn[key] = drawn.get(key, 0) + (end - first) * data["batch_size"]
    return out
