"""The optimizer plane: parameter groups, building (with state carried across phases), lr setting.

Groups: every trainable parameter falls in exactly one group keyed by (decay, lr scale):
- decay: parameters with ndim >= 2 (weight matrices and embeddings) get the weight decay;
  norms' gains and biases (ndim < 2) get none, as usual for transformers;
- lr scale: `lr_scale` maps fnmatch patterns over parameter names to lr multipliers; the FIRST
  pattern (in the mapping's order, i.e. the YAML order) that matches a name wins, else 1.0;
- new: with `warmup_new`, the parameters the phase added (grown stacks) get groups of their own
  (`new: True`), whose lr `set_lr` multiplies by the warmup factor while the others keep theirs.

Each group dict carries `names`, `lr_scale`, `label` and `weight_decay`, so an optimizer built
here can always say which parameter is which (`optimizer_param_names`). See docs/schedule.md.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

import torch
from torch import nn

from stackwise.config import ConfigError, OptimizerConfig, value_at
from stackwise.specs import OptimizerSpec
from stackwise.training.distributed import all_reduce, local

# Optimizers whose per-parameter state has the same meaning can hand it over at a rebuild:
# Adam and AdamW both keep (step, exp_avg, exp_avg_sq); SGD keeps a momentum buffer.
_STATE_FAMILY = {"AdamW": "adam", "Adam": "adam", "SGD": "sgd"}


def _lr_scale_for(name: str, patterns: Mapping[str, float]) -> float:
    """The multiplier of the first pattern that matches `name` (1.0 when none does)."""
    for pattern, scale in patterns.items():
        if fnmatch.fnmatchcase(name, pattern):
            return float(scale)
    return 1.0


def _check_scales(patterns: Mapping[str, float]) -> None:
    bad = [
        (f"optimizer.lr_scale.{p}", "must be a finite number >= 0", s)
        for p, s in patterns.items()
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0
    ]
    if bad:
        raise ConfigError(bad)


def _group_label(decay: bool, scale: float, new: bool = False) -> str:
    kind = "decay" if decay else "no_decay"
    # repr keeps distinct scales distinct (":g" would merge 0.1 and 0.1000001 into one label).
    label = kind if scale == 1.0 else f"{kind}:lr_scale={scale!r}"
    return f"{label}:new" if new else label


def param_groups(model: nn.Module, cfg: OptimizerConfig, new: Collection[str] = ()) -> list[dict[str, Any]]:
    """Trainable parameters of `model` split into (decay, lr scale, new) groups, in first-seen order.

    `new`: names of the parameters the phase added; they get groups of their own (`new: True`)
    only when `cfg.warmup_new` is set, so without it the groups are exactly (decay, lr scale).
    `named_parameters()` lists a tied parameter once (under its first name), so it lands in
    exactly one group.
    """
    _check_scales(cfg.lr_scale)
    new = set(new) if cfg.warmup_new > 0 else set()
    groups: dict[tuple[bool, float, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        decay = param.ndim >= 2
        scale = _lr_scale_for(name, cfg.lr_scale)
        is_new = name in new
        group = groups.get((decay, scale, is_new))
        if group is None:
            group = groups[(decay, scale, is_new)] = {
                "params": [],
                "names": [],
                "label": _group_label(decay, scale, is_new),
                "lr_scale": scale,
                "weight_decay": cfg.weight_decay if decay else 0.0,
            }
            if is_new:
                group["new"] = True
        group["params"].append(param)
        group["names"].append(name)
    return list(groups.values())


def build_optimizer(
    model: nn.Module,
    cfg: OptimizerConfig,
    previous: torch.optim.Optimizer | None = None,
    lr: float | None = None,
    new: Collection[str] = (),
    state_sources: Mapping[str, str] | None = None,
) -> torch.optim.Optimizer:
    """An optimizer over exactly the trainable parameters of `model`.

    `lr` is the base lr to start with (default: the configured lr at τ = 0, times
    lr_multiplier); each group runs at base × its lr_scale, and the groups of `new` parameters
    (with `warmup_new`) start at 0, as their warmup does. With `previous`, optimizer state is
    carried over (see `carry_state`), and the parameters named in `state_sources` start with a
    copy of the state of the parameter named there (grown copies: `grow.optimizer_state: copy`).
    """
    groups = param_groups(model, cfg, new)
    if not groups:
        raise ValueError("the model has no trainable parameters: nothing for the optimizer to update")
    base_lr = value_at(cfg.lr, 0.0) * cfg.lr_multiplier if lr is None else float(lr)
    for group in groups:
        group["lr"] = 0.0 if group.get("new") else base_lr * group["lr_scale"]
    optimizer = _construct(cfg, groups, base_lr)
    if previous is not None:
        carry_state(previous, optimizer, model, copies=state_sources)
    return optimizer


def _construct(cfg: OptimizerConfig, groups: list[dict[str, Any]], base_lr: float) -> torch.optim.Optimizer:
    impl = {"foreach": None, "fused": _use_fused(cfg)}
    if cfg.optimizer_type == "AdamW":
        return torch.optim.AdamW(
            groups, lr=base_lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **impl
        )
    if cfg.optimizer_type == "Adam":
        # Adam's weight decay is L2 added to the gradient (coupled), unlike AdamW's decoupled decay.
        return torch.optim.Adam(
            groups, lr=base_lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay, **impl
        )
    return torch.optim.SGD(groups, lr=base_lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, **impl)


def _use_fused(cfg: OptimizerConfig) -> bool:
    """AdamW/Adam run torch's fused kernel by default: one kernel per tensor for the whole update
    instead of a chain of element-wise ops (on the reference shape on CPU the optimizer step
    takes 7 ms instead of 15). `optimizer.fused: false` restores torch's per-tensor loop."""
    return cfg.fused and cfg.optimizer_type != "SGD"  # SGD keeps torch's default implementation


def carry_state(previous: torch.optim.Optimizer, optimizer: torch.optim.Optimizer, model: nn.Module,
                copies: Mapping[str, str] | None = None) -> int:
    """Hand `previous`'s per-parameter state (moments, step counts) to `optimizer`; return how
    many parameters got state.

    A parameter keeps its state when it is the very tensor `previous` updated, or, failing that,
    when `previous` updated a parameter of the same name and shape that is no longer part of the
    model (the model was rebuilt). The identity rule comes first because names move: prepending a
    stack renames stack 0 to stack 1, and the new stack 0 must start fresh rather than inherit the
    old stack 0's moments. Failing both, a parameter named in `copies` (a grown copy, with
    `grow.optimizer_state: copy`) gets a copy, tensors of its own, of the state of the parameter
    named there, when the shapes match (growth keeps the names of existing stacks). Parameters no
    longer trainable are not in `optimizer`, so their state is dropped; parameters new to training
    start fresh. State is only handed over between optimizers whose state means the same thing
    (Adam ↔ AdamW; SGD ↔ SGD); otherwise everything starts fresh.
    """
    if _STATE_FAMILY.get(type(previous).__name__) != _STATE_FAMILY.get(type(optimizer).__name__):
        return 0
    old_by_name = dict(zip(_names_or_empty(previous), _params(previous), strict=False))
    in_model = {id(p) for p in model.parameters()}
    copies = copies or {}
    carried = 0
    for name, param in zip(optimizer_param_names(optimizer), _params(optimizer), strict=True):
        source = param if param in previous.state else old_by_name.get(name)
        if source is not None and source in previous.state and (
                source is param or (id(source) not in in_model and source.shape == param.shape)):
            optimizer.state[param] = _state_for(previous.state[source], param)
            carried += 1
            continue
        copied = old_by_name.get(copies.get(name, ""))
        if copied is not None and copied in previous.state and copied.shape == param.shape:
            state = _state_for(previous.state[copied], param)  # its source keeps updating its own
            optimizer.state[param] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
            carried += 1
    return carried


def _state_for(state: Mapping[str, Any], param: torch.Tensor) -> dict[str, Any]:
    """The same state tensors, moved only if the parameter changed device or dtype."""
    out = {}
    for key, value in state.items():
        needs_move = isinstance(value, torch.Tensor) and key != "step" and value.shape == param.shape
        if needs_move and (value.device != param.device or value.dtype != param.dtype):
            value = value.to(device=param.device, dtype=param.dtype)
        out[key] = value
    return out


def _params(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _names_or_empty(optimizer: torch.optim.Optimizer) -> list[str]:
    try:
        return optimizer_param_names(optimizer)
    except ValueError:
        return []  # not built here: only the identity rule can carry its state


def optimizer_param_names(optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the parameters `optimizer` updates, in its own order (built by `build_optimizer`)."""
    names: list[str] = []
    for i, group in enumerate(optimizer.param_groups):
        if "names" not in group or len(group["names"]) != len(group["params"]):
            raise ValueError(
                f"param group {i} has no parameter names: build the optimizer with build_optimizer()"
            )
        names.extend(group["names"])
    return names


def set_lr(optimizer: torch.optim.Optimizer, base_lr: float, new_factor: float = 1.0) -> None:
    """Set each group's lr to base_lr × its lr_scale (groups without a scale use 1.0), times
    `new_factor` for the groups of new parameters (`warmup_new`)."""
    for group in optimizer.param_groups:
        factor = new_factor if group.get("new") else 1.0
        group["lr"] = base_lr * group.get("lr_scale", 1.0) * factor


def group_grad_norms(
    optimizer: torch.optim.Optimizer, max_norm: float | None, sharded: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """(global norm, per-group norms) of the gradients, clipping to `max_norm` unless None.

    One pass over the gradients serves both clipping and fault detection: a non-finite group norm
    names the parameter group where a NaN/Inf appeared, with no host sync (0-d / 1-d tensors).
    `sharded`: the gradients are FSDP shards; squared norms are summed over the ranks."""
    norms = []
    for group in optimizer.param_groups:
        grads = [local(p.grad) for p in group["params"] if p.grad is not None]
        if not grads:
            norms.append(None)
        elif sharded:
            norms.append(torch.stack(torch._foreach_norm(grads)).square().sum())
        else:
            norms.append(torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads))))
    device = next((n.device for n in norms if n is not None), torch.device("cpu"))
    group_norms = torch.stack([n if n is not None else torch.zeros((), device=device) for n in norms])
    if sharded:
        group_norms = all_reduce(group_norms, "sum").sqrt()
    total = torch.linalg.vector_norm(group_norms)
    if max_norm is not None:
        # Same rule as torch.nn.utils.clip_grad_norm_: scale by min(1, max_norm / (norm + 1e-6)).
        coef = torch.clamp(max_norm / (total + 1e-6), max=1.0)
        grads = [local(p.grad) for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, coef)
    return total, group_norms


def state_by_name(optimizer: torch.optim.Optimizer) -> dict[str, dict[str, Any]]:
    """Per-parameter optimizer state keyed by parameter name (parameters without state left out)."""
    pairs = zip(optimizer_param_names(optimizer), _params(optimizer), strict=True)
    return {name: dict(optimizer.state[p]) for name, p in pairs if p in optimizer.state}


def saved_state_by_name(saved: Mapping[str, Any], names: list[str]) -> dict[str, dict[str, Any]]:
    """`state_by_name` of an optimizer from its `state_dict()` and `optimizer_param_names`."""
    return {names[int(i)]: dict(state) for i, state in saved["state"].items()}


def load_state_by_name(
    optimizer: torch.optim.Optimizer,
    states: Mapping[str, Mapping[str, Any]],
    place: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = lambda value, param: value,
) -> None:
    """Give each parameter of `optimizer` the state saved under its name; `place` lays a whole
    saved tensor out like its parameter (a shard of it under FSDP)."""
    for name, param in zip(optimizer_param_names(optimizer), _params(optimizer), strict=True):
        if name not in states:
            continue
        state = {
            key: place(value, param) if isinstance(value, torch.Tensor) and value.shape == param.shape else value
            for key, value in states[name].items()
        }
        optimizer.state[param] = _state_for(state, param)


def optimizer_spec(optimizer: torch.optim.Optimizer, cfg: OptimizerConfig) -> OptimizerSpec:
    """The spec `validate_training_state` checks: type, hyperparameters, and parameters by name."""
    optimizer_type = type(optimizer).__name__  # the real object, so a mismatch with cfg shows
    return OptimizerSpec(
        optimizer_type=optimizer_type,
        lr=float(cfg.lr) if isinstance(cfg.lr, (int, float)) else float(cfg.lr.peak),
        weight_decay=float(cfg.weight_decay),
        betas=(float(cfg.betas[0]), float(cfg.betas[1])),
        eps=float(cfg.eps),
        momentum=float(cfg.momentum) if optimizer_type == "SGD" else 0.0,
        grad_clip=cfg.grad_clip,
        param_names=sorted(optimizer_param_names(optimizer)),
        groups={
            g.get("label", f"group{i}"): sorted(g["names"]) for i, g in enumerate(optimizer.param_groups)
        },
    )
