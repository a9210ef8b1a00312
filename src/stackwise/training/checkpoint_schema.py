"""The schema of a checkpoint's `meta.json` and `state.pt`, checked before anything is used.

The checksums in `meta.json` are not keyed: they catch damage, not forgery. Whoever can write the
files can recompute them, so everything read back is checked for its keys, types and ranges here,
and a checkpoint that fails is reported like a damaged one (skipped, named, an older one used)
instead of surfacing later as a KeyError, IndexError or TypeError in the middle of a resume.

What is checked here concerns the checkpoint alone; whether it fits the run being resumed (run
length, phase, rack structure, optimizer parameters) is checked by `lifecycle.py`.
"""

from __future__ import annotations

import math
import re
import reprlib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from stackwise.specs import RackSpec, SpecError

_HEX64 = re.compile(r"[0-9a-f]{64}")
_MT_WORDS = 625  # random.getstate()[1]: 624 Mersenne Twister words and the position
_TRANSITION_KEYS = {"step": int, "t": (int, float), "from_phase": str, "to_phase": str}
_LAYOUT_KINDS = ("param", "scalar", "none")


class SchemaError(ValueError):
    """One field of a checkpoint file is missing or wrong; the message names it."""


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _get(data: Mapping[str, Any], key: str, where: str) -> Any:
    if key not in data:
        raise SchemaError(f"{where}{key}: missing")
    return data[key]


def _int(data: Mapping[str, Any], key: str, where: str, low: int | None = None, high: int | None = None) -> int:
    value = _get(data, key, where)
    if not _is_int(value):
        raise SchemaError(f"{where}{key}: expected an integer, got {_show(value)}")
    if (low is not None and value < low) or (high is not None and value > high):
        bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
        raise SchemaError(f"{where}{key}: {value} is outside {bounds}")
    return value


def _number(data: Mapping[str, Any], key: str, where: str, low: float | None = None) -> float:
    value = _get(data, key, where)
    if not _is_number(value) or (low is not None and value < low):
        raise SchemaError(f"{where}{key}: expected a finite number{f' >= {low}' if low is not None else ''}, "
                          f"got {_show(value)}")
    return float(value)


def _typed(data: Mapping[str, Any], key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    value = _get(data, key, where)
    if not isinstance(value, kind):
        names = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
        raise SchemaError(f"{where}{key}: expected {names}, got {_show(value)}")
    return value


def _show(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return f"{type(value).__name__} {reprlib.repr(value)}"  # bounded, however deep or long the value


# ---- meta.json --------------------------------------------------------------------------------


def check_meta(meta: Any) -> None:
    """The fields of `meta.json` (a parsed JSON value) that the loader and a resume use."""
    if not isinstance(meta, dict):
        raise SchemaError(f"expected a JSON object, got {type(meta).__name__}")
    _int(meta, "format_version", "")
    sums = _typed(meta, "sha256", "", dict)
    for name, digest in sums.items():
        if not isinstance(digest, str) or not _HEX64.fullmatch(digest):
            raise SchemaError(f"sha256.{name}: not a sha256 hex digest")
        if Path(name).is_absolute() or ".." in Path(name).parts or "\x00" in name or not name:
            raise SchemaError(f"sha256: lists a file outside the checkpoint ({name!r})")
    total = _int(meta, "total_steps", "", low=1)
    step = _int(meta, "step", "", low=0, high=total)
    t = _number(meta, "t", "")
    if abs(t - step / total) > 1e-9:
        raise SchemaError(f"t: {t} is not step/total_steps = {step}/{total}")
    _typed(meta, "phase", "", str)
    _int(meta, "phase_index", "", low=-1)
    try:
        RackSpec.from_dict(_typed(meta, "rack", "", dict)).validate()
    except (SpecError, TypeError, ValueError) as err:
        raise SchemaError(f"rack: {err}") from None
    tied = meta.get("tied", {})
    if not isinstance(tied, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tied.items()):
        raise SchemaError("tied: expected a mapping of tensor names")


# ---- state.pt ---------------------------------------------------------------------------------


def check_state(state: Any, meta: Mapping[str, Any], sharded: bool) -> None:
    """The training state as `torch.load(weights_only=True)` returned it, against its meta.json."""
    if not isinstance(state, dict):
        raise SchemaError(f"expected a dict of training state, got {type(state).__name__}")
    time = _typed(state, "time", "", dict)
    total = _int(time, "total_steps", "time.", low=1)
    step = _int(time, "step", "time.", low=0, high=total)
    if (step, total) != (meta["step"], meta["total_steps"]):
        raise SchemaError(f"time: step {step} of {total}, meta.json says {meta['step']} of {meta['total_steps']}")
    index = _int(state, "phase_index", "", low=-1)
    if index != meta["phase_index"]:
        raise SchemaError(f"phase_index: {index}, meta.json says {meta['phase_index']}")
    names = _typed(state, "optimizer_names", "", list)
    if not all(isinstance(n, str) for n in names) or len(set(names)) != len(names):
        raise SchemaError("optimizer_names: expected distinct parameter names")
    _check_rng(_typed(state, "rng", "", dict))
    losses = _typed(state, "losses", "", torch.Tensor)
    if losses.ndim != 1 or not losses.is_floating_point() or losses.numel() > step:
        raise SchemaError(f"losses: expected at most {step} floats (one per step run), got {_show(losses)}")
    _int(state, "tokens_seen", "", low=0)
    _number(state, "wall", "", low=0)
    if "flops" in state:  # training FLOPs so far; older checkpoints lack it
        _int(state, "flops", "", low=0)
    _int(state, "metrics_lines", "", low=0)
    for i, tr in enumerate(_typed(state, "transitions", "", list)):
        if not isinstance(tr, dict) or set(tr) != set(_TRANSITION_KEYS) or \
                not all(isinstance(tr[k], kind) and not isinstance(tr[k], bool) for k, kind in _TRANSITION_KEYS.items()):
            raise SchemaError(f"transitions.{i}: expected {{step, t, from_phase, to_phase}}, got {_show(tr)}")
    last_eval = _typed(state, "last_eval", "", dict)
    if not all(isinstance(k, str) and (_is_number(v) or (isinstance(v, float) and math.isnan(v)))
               for k, v in last_eval.items()):
        raise SchemaError("last_eval: expected names and numbers")
    if sharded:
        _check_layout(_typed(state, "optimizer_layout", "", dict), names)
    else:
        _check_optimizer(_typed(state, "optimizer", "", dict), names)


def _check_rng(rng: dict[str, Any]) -> None:
    expected = torch.get_rng_state()
    value = _typed(rng, "torch", "rng.", torch.Tensor)
    if value.dtype != torch.uint8 or value.shape != expected.shape:
        raise SchemaError(f"rng.torch: expected a uint8 tensor of shape {tuple(expected.shape)}, got {_show(value)}")
    words = _typed(rng, "python", "rng.", list)
    if len(words) != _MT_WORDS or not all(_is_int(w) and 0 <= w < 2**32 for w in words) or words[-1] > _MT_WORDS - 1:
        raise SchemaError(f"rng.python: expected {_MT_WORDS} Mersenne Twister words")
    cuda = rng.get("cuda")
    if cuda is not None and (not isinstance(cuda, torch.Tensor) or cuda.dtype != torch.uint8 or cuda.ndim != 1):
        raise SchemaError(f"rng.cuda: expected a uint8 tensor, got {_show(cuda)}")


def _check_optimizer(saved: dict[str, Any], names: list[str]) -> None:
    """A `torch.optim.Optimizer.state_dict()` over exactly the parameters `names` lists."""
    if not saved:  # a machine that had not entered a phase yet
        if names:
            raise SchemaError("optimizer: empty, but optimizer_names lists parameters")
        return
    groups = _typed(saved, "param_groups", "optimizer.", list)
    indices: list[Any] = []
    for i, group in enumerate(groups):
        if not isinstance(group, dict) or not isinstance(group.get("params"), list):
            raise SchemaError(f"optimizer.param_groups.{i}: expected a mapping with a params list")
        for key in ("lr", "weight_decay"):
            if key in group and not _is_number(group[key]):
                raise SchemaError(f"optimizer.param_groups.{i}.{key}: expected a finite number, got {_show(group[key])}")
        indices += group["params"]
    if not all(_is_int(i) for i in indices) or sorted(indices) != list(range(len(names))):
        raise SchemaError(f"optimizer.param_groups: the parameters are not exactly the {len(names)} of optimizer_names")
    for key, entry in _typed(saved, "state", "optimizer.", dict).items():
        if not _is_int(key) or not 0 <= key < len(names):
            raise SchemaError(f"optimizer.state: key {key!r} is not a parameter index")
        if not isinstance(entry, dict) or not all(isinstance(k, str) for k in entry):
            raise SchemaError(f"optimizer.state.{key}: expected a mapping of state entries")
        for name, value in entry.items():
            if value is not None and not isinstance(value, (torch.Tensor, int, float)):
                raise SchemaError(f"optimizer.state.{key}.{name}: expected a tensor or a number, got {_show(value)}")


def _check_layout(layout: dict[str, Any], names: list[str]) -> None:
    known = set(names)
    for name, keys in layout.items():
        if name not in known:
            raise SchemaError(f"optimizer_layout: {name!r} is not among optimizer_names")
        if not isinstance(keys, dict) or not all(isinstance(k, str) and v in _LAYOUT_KINDS for k, v in keys.items()):
            raise SchemaError(f"optimizer_layout.{name}: expected entries of kind {_LAYOUT_KINDS}")


def optimizer_tensors(state: Mapping[str, Any]) -> list[tuple[str, torch.Tensor]]:
    """The optimizer state's tensors with readable names (for the finiteness check)."""
    saved = state.get("optimizer") or {}
    names = state.get("optimizer_names", [])
    out = []
    for index, entry in saved.get("state", {}).items():
        owner = names[index] if _is_int(index) and 0 <= index < len(names) else str(index)
        out += [(f"optimizer.{owner}.{key}", value) for key, value in entry.items() if isinstance(value, torch.Tensor)]
    return out
