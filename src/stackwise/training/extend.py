"""Extending a run past its length: `stackwise train --resume RUN --steps N [--extend EXT.yaml]`.

Normalized time t = step / total_steps would move every phase boundary if the run length just
changed, so the extended config states its phases in steps instead: each phase of the run keeps
exactly the steps it had, and then either

- the last phase is stretched to end at step N (its lr shape and ramps are functions of the
  phase's local time τ, so they are recomputed over its new length from the resumed step on), or
- the `schedule` of EXT.yaml is appended: its phases are given in steps counted from the end of
  the run (`start_step: 0` is the first new step) or in t over the extension's N − T steps.

A run given in tokens or epochs runs (and is recorded) in steps (docs/schedule.md, "Time in
tokens and epochs"), so it extends like any other; appended phases are given in steps or t.

Everything else about the run is unchanged, so the extended run resumes exactly like any run, and
it equals an uninterrupted run of length N wherever the schedule makes them the same (a constant
lr, or phases whose steps did not move).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from stackwise.config import ConfigError, StackWiseConfig, parse_config_yaml, read_config_file
from stackwise.time_units import BOUND_KEYS
from stackwise.training.schedule import PhaseSchedule, step_at

_TIME_KEYS = tuple(key for keys in BOUND_KEYS.values() for key in keys)


def extended_config(config: StackWiseConfig, total_steps: int | None,
                    extension: str | os.PathLike[str] | list[dict[str, Any]] | None = None) -> StackWiseConfig:
    """The config of `config`'s run (T steps) continued to `total_steps` steps."""
    config = config.in_steps()  # a run given in tokens (epochs: converted with the corpus before)
    old_total = config.resolved_total_steps()
    added = _extension_phases(extension)
    if total_steps is None:
        total_steps = old_total + _extension_length(added)
    if total_steps <= old_total:
        raise ConfigError([("--steps", f"the run has {old_total} steps; extending it needs more than that "
                                       "(a run cannot be shortened)", total_steps)])
    data = config.model_dump(mode="json", by_alias=True, exclude_unset=True)
    phases = _phases_in_steps(config, old_total)
    if added:
        phases += _appended(added, old_total, total_steps - old_total)
    else:
        phases[-1]["end_step"] = total_steps
    data["schedule"] = phases
    data.setdefault("training", {})["total_steps"] = total_steps
    return StackWiseConfig.from_dict(data, source="the extended run")


def _phases_in_steps(config: StackWiseConfig, total: int) -> list[dict[str, Any]]:
    """The run's phases with the step ranges they had, as start_step / end_step."""
    schedule = PhaseSchedule.from_config(config, total)
    given = [p.model_dump(mode="json", by_alias=True, exclude_unset=True) for p in config.schedule or []]
    if not given:  # a run without a schedule is one phase; it now needs a name to append after
        given = [{"name": schedule.phases[0].name}]
    out = []
    for phase, (first, end) in zip(given, schedule.step_ranges(total), strict=True):
        body = {k: v for k, v in phase.items() if k not in _TIME_KEYS}
        out.append({**body, "start_step": first, "end_step": end})
    return out


def _extension_phases(extension: str | os.PathLike[str] | list[dict[str, Any]] | None) -> list[dict[str, Any]]:
    if extension is None:
        return []
    if isinstance(extension, list):
        return [dict(p) for p in extension]
    path = Path(extension)
    # A regular file of bounded size, safe YAML with depth and alias expansion bounded (config.py).
    body = parse_config_yaml(read_config_file(path, what="extension"), str(path))
    if not isinstance(body, dict) or set(body) != {"schedule"} or not isinstance(body["schedule"], list) \
            or not body["schedule"] or not all(isinstance(p, dict) for p in body["schedule"]):
        raise ConfigError([("schedule", "an extension file holds exactly one key, schedule: a list of phases "
                                        "to append", None)], str(path))
    return body["schedule"]


def _extension_length(phases: list[dict[str, Any]]) -> int:
    ends = [p.get("end_step") for p in phases]
    if not phases or any(not isinstance(e, int) for e in ends):
        raise ConfigError([("--steps", "give the new run length (the extension's phases are not all in steps)", None)])
    return max(ends)


def _appended(phases: list[dict[str, Any]], offset: int, length: int) -> list[dict[str, Any]]:
    """Extension phases in the run's steps: step bounds shifted by the old length, t bounds mapped
    onto the extension's `length` steps."""
    out = []
    for i, phase in enumerate(phases):
        body = {k: v for k, v in phase.items() if k not in _TIME_KEYS}
        if any(k in phase for k in (*BOUND_KEYS["tokens"], *BOUND_KEYS["epoch"])):
            raise ConfigError([(f"schedule.{i}", "an appended phase is given in steps (counted from the end of the "
                                                 "run) or in t; tokens and epochs are not supported here", None)])
        if "start_step" in phase or "end_step" in phase:
            start, end = phase.get("start_step"), phase.get("end_step")
        elif "start_t" in phase or "end_t" in phase:
            start, end = (_step_of(phase.get(key), length) for key in ("start_t", "end_t"))
        else:
            raise ConfigError([(f"schedule.{i}", "an appended phase needs start_step/end_step or start_t/end_t", None)])
        if not isinstance(start, int) or not isinstance(end, int):
            raise ConfigError([(f"schedule.{i}", "start and end must both be given as numbers", phase.get("name"))])
        out.append({**body, "start_step": offset + start, "end_step": offset + end})
    return out


def _step_of(t: Any, length: int) -> int | None:
    return step_at(float(t), length) if isinstance(t, (int, float)) and 0 <= t <= 1 else None
