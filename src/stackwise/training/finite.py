"""Finiteness checks for weights and optimizer state: the last line before a checkpoint, a resume
or the end of a step.

- `nonfinite_tensors(named)`: the names of the floating-point tensors holding a NaN or an Inf
  (exact), with one host sync for all of them, two when something is found (a checkpoint about
  to be written, or just loaded).
- `params_finite(params)` / `group_params_finite(optimizer)`: the same question as a boolean
  tensor that stays on the device (no sync), for the training step.
- `UpdateUndo`: keeps a copy of the trainable weights and the optimizer state from before an
  update, so `run.on_nonfinite: skip_step` can take back an update that poisoned the weights.

The screen is each tensor's L2 norm from `torch._foreach_norm` (one fused kernel per device and
dtype on CUDA, the fastest reduction torch has on CPU too: 0.3 ns an element against 3.6 ns for
the max-abs norm, measured here): a NaN or an Inf in a tensor makes its norm NaN or Inf. So does
a sum of squares beyond float32 (an entry above ~1.8e19), which the device-side checks count as
non-finite too: no model survives such a weight, its forward pass overflows. `nonfinite_tensors`
confirms every flagged tensor exactly (`isfinite().all()`), so it names only tensors that really
hold a NaN or an Inf. Sharded (DTensor) tensors are checked on this rank's shard; NF4 tensors
(and other traceable tensor subclasses) through their inner tensors, of which only the floating
ones can be non-finite; integer and boolean tensors are skipped.
"""

from __future__ import annotations

import weakref
from collections import defaultdict
from collections.abc import Iterable, Sequence
from typing import Any

import torch

from stackwise.training.distributed import local

_PLAIN = (torch.Tensor, torch.nn.Parameter)
_FOREACH = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _float_parts(t: torch.Tensor) -> list[torch.Tensor]:
    """The plain floating-point tensors that hold `t`'s values (empty for integer tensors)."""
    t = local(t)
    if type(t) not in _PLAIN and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()  # NF4Tensor: codes (uint8), scales (int8), their scale (float)
        return [part for name in names for part in _float_parts(getattr(t, name))]
    if not (t.is_floating_point() or t.is_complex()) or t.numel() == 0:
        return []
    return [t.detach()]


def _screen(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Per tensor, a 0-d float32 tensor on its device that is finite iff the tensor passes the screen."""
    out: list[torch.Tensor | None] = [None] * len(tensors)
    groups: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        groups[(t.device, t.dtype)].append(i)
    for (_, dtype), index in groups.items():
        batch = [tensors[i] for i in index]
        if dtype in _FOREACH:
            # float16 norms are taken in float32: a sum of squares beyond 65504 is no fault.
            norms = torch._foreach_norm(batch, 2, dtype=torch.float32 if dtype == torch.float16 else None)
        else:  # float8, complex: no foreach norm
            norms = [torch.isfinite(t).all().float().log() for t in batch]  # 0 or -inf
        for i, n in zip(index, norms, strict=True):
            out[i] = n
    return out  # type: ignore[return-value]


def _finite_flags(tensors: Sequence[torch.Tensor], values: Sequence[torch.Tensor]) -> list[bool]:
    """`isfinite` of one 0-d tensor per entry, brought to the host with one transfer per device."""
    by_device: dict[torch.device, list[int]] = defaultdict(list)
    for i, t in enumerate(tensors):
        by_device[t.device].append(i)
    flags = [True] * len(tensors)
    for index in by_device.values():
        ok = torch.isfinite(torch.stack([values[i].float() for i in index])).tolist()
        for i, value in zip(index, ok, strict=True):
            flags[i] = bool(value)
    return flags


def nonfinite_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> list[str]:
    """Names of the tensors in `named` holding a NaN or an Inf, in the given order (exact).

    One host sync for all of them (per device), and a second only when the screen flags a
    tensor. Meant for the moments a wrong answer costs most: before a checkpoint is written and
    after one is loaded."""
    names: list[str] = []
    owners: list[int] = []
    parts: list[torch.Tensor] = []
    for name, tensor in named:
        if not isinstance(tensor, torch.Tensor):
            continue
        pieces = _float_parts(tensor)
        if pieces:
            names.append(name)
            owners += [len(names) - 1] * len(pieces)
            parts += pieces
    if not parts:
        return []
    passed = _finite_flags(parts, _screen(parts))
    suspects = [i for i, ok in enumerate(passed) if not ok]
    if suspects:  # a huge but finite tensor fails the screen too: confirm each one exactly
        sure = _finite_flags([parts[i] for i in suspects],
                             [torch.isfinite(parts[i]).all().float().log() for i in suspects])
        for i, ok in zip(suspects, sure, strict=True):
            passed[i] = ok
    bad = {owner for owner, ok in zip(owners, passed, strict=True) if not ok}
    return [name for i, name in enumerate(names) if i in bad]


def params_finite(params: Iterable[torch.Tensor]) -> torch.Tensor:
    """True (a 0-d bool tensor, on the first parameter's device, no host sync) when every
    parameter passes the screen: no NaN, no Inf."""
    parts = [part for p in params for part in _float_parts(p)]
    if not parts:
        return torch.ones((), dtype=torch.bool)
    device = parts[0].device
    return torch.isfinite(torch.stack([n.to(device).float() for n in _screen(parts)])).all()


# Per optimizer, what `group_params_finite` derives from its parameter groups (cached while they
# stay the same lists of plain parameters: a phase change builds a new optimizer). The cache holds
# the Parameter objects themselves, never detached views, so a `.data` swapped later is still read.
_PLANS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _plan(optimizer: torch.optim.Optimizer, device: torch.device | None) -> tuple[list[torch.Tensor], torch.Tensor, int]:
    groups = optimizer.param_groups
    key = tuple((id(g["params"]), len(g["params"])) for g in groups)
    cached = _PLANS.get(optimizer)
    if cached is not None and cached[0] == key and cached[1] == device:
        return cached[2]
    parts: list[torch.Tensor] = []
    owner: list[int] = []
    plain = True
    for i, group in enumerate(groups):
        for p in group["params"]:
            if type(p) in _PLAIN:
                pieces = [p] if (p.is_floating_point() or p.is_complex()) and p.numel() else []
            else:
                plain = False
                pieces = _float_parts(p)
            parts += pieces
            owner += [i] * len(pieces)
    if device is None:
        device = parts[0].device if parts else torch.device("cpu")
    plan = (parts, torch.tensor(owner, dtype=torch.long, device=device), len(groups))
    if plain:  # sharded parameters' local views are taken afresh at every call
        _PLANS[optimizer] = (key, device, plan)
    return plan


def group_params_finite(optimizer: torch.optim.Optimizer, device: torch.device | None = None) -> torch.Tensor:
    """Per parameter group of `optimizer`, whether all its parameters pass the screen (no NaN, no
    Inf): a (groups,) bool tensor on `device` (the first parameter's by default), no host sync."""
    parts, owner, n_groups = _plan(optimizer, device)
    if not parts:
        return torch.ones(n_groups, dtype=torch.bool, device=owner.device)
    with torch.no_grad():
        norms = _screen(parts)
        bad = ~torch.isfinite(torch.stack([n.to(owner.device).float() for n in norms]))
        counts = torch.zeros(n_groups, dtype=torch.int32, device=owner.device).index_add_(0, owner, bad.to(torch.int32))
    return counts == 0


class UpdateUndo:
    """The trainable weights and the optimizer state as they were before an update.

    `save(optimizer)` copies them into buffers kept from step to step (reallocated only when the
    set of tensors changes, e.g. at a phase change or when the optimizer creates its state on
    its first step); `restore(optimizer)` puts them back, and drops the state of parameters that
    had none before. Costs one copy of the weights and of every optimizer state tensor in memory
    (AdamW: 3× the trainable weights), and one read and one write of them per step.
    """

    def __init__(self) -> None:
        self._signature: tuple[Any, ...] | None = None
        self._sources: list[torch.Tensor] = []
        self._copies: list[torch.Tensor] = []
        self._stateless: list[torch.Tensor] = []  # parameters without optimizer state at `save`
        self._scalars: list[tuple[dict[str, Any], str, Any]] = []  # non-tensor state (e.g. a float step)

    def _collect(self, optimizer: torch.optim.Optimizer) -> None:
        sources, stateless, scalars = [], [], []
        for group in optimizer.param_groups:
            for p in group["params"]:
                sources.append(local(p).detach())
                state = optimizer.state.get(p)
                if not state:
                    stateless.append(p)
                    continue
                for key, value in state.items():
                    if isinstance(value, torch.Tensor):
                        sources.append(local(value).detach())
                    else:
                        scalars.append((state, key, value))
        self._sources, self._stateless, self._scalars = sources, stateless, scalars

    def save(self, optimizer: torch.optim.Optimizer) -> None:
        self._collect(optimizer)
        signature = tuple((t.shape, t.dtype, t.device) for t in self._sources)  # the buffers are positional
        if signature != self._signature:
            self._copies = [torch.empty_like(t) for t in self._sources]
            self._signature = signature
        _copy(self._copies, self._sources)

    def restore(self, optimizer: torch.optim.Optimizer) -> None:
        if self._signature is None:
            raise RuntimeError("UpdateUndo.restore without a save")
        _copy(self._sources, self._copies)
        for state, key, value in self._scalars:
            state[key] = value
        for p in self._stateless:
            optimizer.state.pop(p, None)

    def release(self) -> None:
        """Free the buffers (they come back at the next `save`)."""
        self.__init__()


def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    if not dst:
        return
    pairs: dict[tuple[torch.device, torch.dtype], list[int]] = defaultdict(list)
    for i, t in enumerate(dst):
        pairs[(t.device, t.dtype)].append(i)
    with torch.no_grad():
        for index in pairs.values():
            torch._foreach_copy_([dst[i] for i in index], [src[i] for i in index])
