"""Resume never rewrites history: the config a run is resumed with, compared with the one on record.

A run directory's `config.yaml` says how its steps were made. `--resume` may be given another
config (a config file, `key=value` overrides), so the two are compared field by field, and each
difference is either

- **refused**, when it would change the steps already run, or the trajectory from the checkpoint
  on in a way that makes the resumed run differ from the run on record: the model (shapes, init),
  `training.seed`, `training.grad_accum_steps`, the tokenizer, `data.val_fraction`,
  `data.use_dummy_data`, the run length (outside `--steps N` / `--extend`), and every setting of a
  phase already entered (its name, its steps, its resolved data, optimizer and model plane; a run
  setting such as `training.optimizer.lr` counts through the phases that use it);
- **allowed**, otherwise: the `run` section (eval, log and checkpoint intervals, keep_last,
  threads, device, precision, distributed, the activation cache, loggers, ...),
  `data.cache_dir`, and the settings of phases not entered yet. The resumed run then keeps the
  earlier config as `config-<step>.yaml` and records the change in a `resume` event.

A run resumed before its first checkpoint restarts from step 0: nothing has run, so everything
is allowed (and recorded).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from stackwise.config import Ramp, StackWiseConfig
from stackwise.training.schedule import PhaseSchedule, resolve_data, resolve_optimizer

# Fields whose every change reaches the steps already run.
_REFUSED = ("model", "training.seed", "training.grad_accum_steps", "data.tokenizer", "data.val_fraction",
            "data.use_dummy_data")
# Fields that reach a step only through the phases that use them: compared phase by phase.
_THROUGH_PHASES = ("schedule", "training.total_steps", "training.batch_size", "training.seq_len", "training.optimizer",
                   "training.progressive", "data.paths", "data.text_field", "data.objective", "data.mask_rate",
                   "data.mask_range")


@dataclass
class Changes:
    refused: list[str] = field(default_factory=list)
    allowed: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.refused or self.allowed)


def compare(recorded: StackWiseConfig, given: StackWiseConfig, *, recorded_steps: int, given_steps: int,
            step: int, phase_index: int, extending: bool) -> Changes:
    """The differences between the config on record (a run of `recorded_steps`) and the one it is
    resumed with (`given_steps`), at `step` in phase `phase_index` (-1: no phase entered)."""
    changes = Changes()
    old, new = _flat(recorded.to_dict()), _flat(given.to_dict())
    for path in sorted(set(old) | set(new)):
        if old.get(path, _MISSING) == new.get(path, _MISSING) or _under(path, _THROUGH_PHASES):
            continue
        line = f"{path}: {_show(old.get(path, _MISSING))} → {_show(new.get(path, _MISSING))}"
        (changes.refused if _under(path, _REFUSED) else changes.allowed).append(line)
    if recorded_steps != given_steps and not extending:
        changes.refused.append(f"training.total_steps: {recorded_steps} → {given_steps} (to continue a run past "
                               "its end use --steps N or --extend FILE: docs/interop.md)")
    old_phases, new_phases = _phases(recorded, recorded_steps), _phases(given, given_steps)
    for i in range(max(len(old_phases), len(new_phases))):
        entered = i <= phase_index
        before = old_phases[i] if i < len(old_phases) else None
        after = new_phases[i] if i < len(new_phases) else None
        name = (before or after)["name"]
        where = f"phase {i} {name!r} ({_status(before, entered)})"
        if before is None or after is None:
            line = f"{where}: {'added' if before is None else 'removed'}"
            (changes.refused if entered else changes.allowed).append(line)
            continue
        stretched = extending and i == len(old_phases) - 1  # --steps N moves the last phase's end
        for path in sorted(set(before) | set(after)):
            a, b = before.get(path, _MISSING), after.get(path, _MISSING)
            if a == b or (stretched and path == "steps"):
                if a != b:
                    changes.allowed.append(f"{where} steps: {_show(a)} → {_show(b)} (extended)")
                continue
            (changes.refused if entered else changes.allowed).append(f"{where} {path}: {_show(a)} → {_show(b)}")
    if step == 0:  # nothing has run yet: nothing can be rewritten
        changes.allowed, changes.refused = changes.refused + changes.allowed, []
    return changes


def refusal(run_dir: Any, changes: Changes) -> str:
    lines = "\n".join(f"  - {line}" for line in changes.refused)
    return (f"{run_dir}: --resume would change how the steps already run were made, so the resumed run would no "
            f"longer be the run on record:\n{lines}\nUndo these changes to resume; to train differently from here, "
            "start a new run from this one's weights (model.init_from: RUN_DIR). Allowed on resume: the run section "
            "(intervals, device, threads, ...), data.cache_dir, and phases not started yet.")


# ---- helpers -----------------------------------------------------------------------------------

_MISSING = object()


def _phases(config: StackWiseConfig, total_steps: int) -> list[dict[str, Any]]:
    """Each phase as the machine runs it: name, step range, resolved data/optimizer/model planes."""
    schedule = PhaseSchedule.from_config(config, total_steps)
    out = []
    for phase, (first, end) in zip(schedule.phases, schedule.step_ranges(total_steps), strict=True):
        view = {
            "name": phase.name,
            "steps": [first, end],
            "data": {k: (v.model_dump(mode="json") if isinstance(v, Ramp) else v)
                     for k, v in resolve_data(config, phase, tau=None).items()},
            "optimizer": resolve_optimizer(config.training.optimizer, phase).model_dump(mode="json"),
            "model": phase.model.model_dump(mode="json"),
        }
        out.append(_flat(view))
    return out


def _flat(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            out.update(_flat(value, path + "."))
        else:
            out[path] = list(value) if isinstance(value, tuple) else value
    return out


def _under(path: str, prefixes: tuple[str, ...]) -> bool:
    return any(path == p or path.startswith(p + ".") for p in prefixes)


def _status(view: dict[str, Any] | None, entered: bool) -> str:
    if not entered:
        return "not started"
    first, end = view["steps"] if view else ("?", "?")
    return f"steps {first}-{end}, entered"


def _show(value: Any) -> str:
    return "(absent)" if value is _MISSING else repr(value)
