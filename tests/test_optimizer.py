"""The optimizer plane (stackwise.training.optimizer) on a tiny stand-in for the model."""

import copy

import pytest
import torch
from torch import nn

from stackwise.config import ConfigError, LrSchedule, OptimizerConfig, StackWiseConfig
from stackwise.training.optimizer import (
    build_optimizer,
    group_grad_norms,
    optimizer_param_names,
    optimizer_spec,
    param_groups,
    set_lr,
)

D, V = 8, 16


def new_stack() -> nn.Module:
    return nn.Sequential(nn.LayerNorm(D), nn.Linear(D, D))


class Tiny(nn.Module):
    """Embedding → rack.stacks → head tied to the embedding: the names the real model uses."""

    def __init__(self, n_stacks: int = 2):
        super().__init__()
        self.embed = nn.Embedding(V, D)
        self.rack = nn.Module()
        self.rack.stacks = nn.ModuleList(new_stack() for _ in range(n_stacks))
        self.head = nn.Linear(D, V, bias=False)
        self.head.weight = self.embed.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        for stack in self.rack.stacks:
            h = h + stack(h)
        return self.head(h)

    def prepend(self) -> None:
        self.rack.stacks.insert(0, new_stack())


def train(model: nn.Module, opt: torch.optim.Optimizer, steps: int, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randint(0, V, (2, 5), generator=gen)
        loss = nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()


def state_by_name(opt: torch.optim.Optimizer) -> dict[str, dict]:
    params = [p for g in opt.param_groups for p in g["params"]]
    return {n: opt.state[p] for n, p in zip(optimizer_param_names(opt), params, strict=True) if opt.state[p]}


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---- groups ----------------------------------------------------------------------------------


def test_decay_groups_split_by_dimension_and_skip_frozen():
    model = Tiny()
    model.rack.stacks[0].requires_grad_(False)
    groups = {g["label"]: g for g in param_groups(model, OptimizerConfig(weight_decay=0.1))}
    assert set(groups) == {"decay", "no_decay"}
    assert groups["decay"]["names"] == ["embed.weight", "rack.stacks.1.1.weight"]
    assert groups["no_decay"]["names"] == ["rack.stacks.1.0.weight", "rack.stacks.1.0.bias", "rack.stacks.1.1.bias"]
    assert groups["decay"]["weight_decay"] == 0.1 and groups["no_decay"]["weight_decay"] == 0.0
    # The tied head weight is the embedding: listed once, never as head.weight.
    all_names = [n for g in groups.values() for n in g["names"]]
    assert "head.weight" not in all_names and all_names.count("embed.weight") == 1


def test_lr_scale_first_matching_pattern_wins():
    cfg = OptimizerConfig(lr=1e-3, lr_scale={"rack.stacks.0.*": 0.1, "rack.*": 0.5})
    opt = build_optimizer(Tiny(), cfg)
    scale_of = {n: g["lr_scale"] for g in opt.param_groups for n in g["names"]}
    assert scale_of["rack.stacks.0.1.weight"] == 0.1
    assert scale_of["rack.stacks.1.1.weight"] == 0.5
    assert scale_of["embed.weight"] == 1.0
    for g in opt.param_groups:
        assert g["lr"] == pytest.approx(1e-3 * g["lr_scale"])
    set_lr(opt, 2e-3)
    assert sorted(g["lr"] for g in opt.param_groups) == pytest.approx(sorted(2e-3 * g["lr_scale"] for g in opt.param_groups))
    assert len(opt.param_groups) == 5  # (decay, no_decay) × (0.1, 0.5), decay × 1.0 (embed only)
    reordered = OptimizerConfig(lr_scale={"rack.*": 0.5, "rack.stacks.0.*": 0.1})
    assert {n: g["lr_scale"] for g in param_groups(Tiny(), reordered) for n in g["names"]}["rack.stacks.0.1.weight"] == 0.5


def test_negative_lr_scale_is_a_config_error():
    # The config refuses it (the same rule at the top level and in a phase's optimizer_config) ...
    base = {"model": {"d_model": 32, "n_heads": 2}, "training": {}, "data": {}}
    with pytest.raises(ConfigError) as err:
        StackWiseConfig.from_dict({**base, "training": {"optimizer": {"lr_scale": {"rack.*": -1.0}}}})
    assert err.value.paths == ["training.optimizer.lr_scale.rack.*"]
    phase = {"name": "a", "start_t": 0.0, "end_t": 1.0, "optimizer_config": {"lr_scale": {"rack.*": float("nan")}}}
    with pytest.raises(ConfigError) as err:
        StackWiseConfig.from_dict({**base, "schedule": [phase]})
    assert err.value.paths == ["schedule.0.optimizer_config.lr_scale.rack.*"]
    # ... and so does the optimizer plane, for a config built around validation
    with pytest.raises(ConfigError) as err:
        param_groups(Tiny(), OptimizerConfig.model_construct(lr_scale={"rack.*": -1.0}, weight_decay=0.1))
    assert err.value.paths == ["optimizer.lr_scale.rack.*"]


@pytest.mark.parametrize("kind", ["AdamW", "Adam", "SGD"])
def test_builds_each_optimizer_type(kind):
    model = Tiny()
    cfg = OptimizerConfig(optimizer_type=kind, lr=0.01, weight_decay=0.05, betas=(0.8, 0.9), momentum=0.7)
    opt = build_optimizer(model, cfg)
    assert type(opt).__name__ == kind
    group = opt.param_groups[0]
    if kind == "SGD":
        assert group["momentum"] == 0.7
    else:
        assert group["betas"] == (0.8, 0.9)
    before = model.rack.stacks[1][1].weight.detach().clone()
    train(model, opt, 1)
    assert not torch.equal(before, model.rack.stacks[1][1].weight)


def test_fused_kernel_is_the_default_and_can_be_turned_off():
    model = Tiny()
    fused = build_optimizer(model, OptimizerConfig())
    assert fused.defaults["fused"] is True
    assert build_optimizer(model, OptimizerConfig(fused=False)).defaults["fused"] is False
    reference = copy.deepcopy(model)
    train(reference, build_optimizer(reference, OptimizerConfig(fused=False)), 3)
    train(model, fused, 3)  # the fused CPU kernel: same update up to rounding
    for a, b in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert build_optimizer(model, OptimizerConfig(optimizer_type="SGD", fused=True)).defaults["fused"] is False


def test_schedule_lr_starts_at_its_value_at_tau_zero():
    opt = build_optimizer(Tiny(), OptimizerConfig(lr=LrSchedule(peak=1e-3, warmup=0.1)))
    assert all(g["lr"] == 0.0 for g in opt.param_groups)
    opt = build_optimizer(Tiny(), OptimizerConfig(lr=LrSchedule(peak=1e-3)), lr=5e-4)
    assert all(g["lr"] == 5e-4 for g in opt.param_groups)


def test_no_trainable_parameters_is_an_error():
    model = Tiny()
    model.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameters"):
        build_optimizer(model, OptimizerConfig())


# ---- state carry-over ------------------------------------------------------------------------


def test_rebuild_carries_state_of_surviving_parameters():
    model, cfg = Tiny(), OptimizerConfig()
    opt = build_optimizer(model, cfg)
    train(model, opt, 3)
    before = {n: {k: v.clone() for k, v in s.items()} for n, s in state_by_name(opt).items()}

    model.rack.stacks[0].requires_grad_(False)
    opt2 = build_optimizer(model, cfg, previous=opt)
    after = state_by_name(opt2)
    assert not any(n.startswith("rack.stacks.0.") for n in optimizer_param_names(opt2))
    assert set(after) == {n for n in before if not n.startswith("rack.stacks.0.")}
    for name, state in after.items():
        assert int(state["step"]) == 3
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(state[key], before[name][key]), (name, key)

    # Unfreezing brings stack 0 back as a new parameter: it starts fresh.
    model.rack.stacks[0].requires_grad_(True)
    opt3 = build_optimizer(model, cfg, previous=opt2)
    assert not any(n.startswith("rack.stacks.0.") for n in state_by_name(opt3))
    train(model, opt3, 1)
    steps = {n: int(s["step"]) for n, s in state_by_name(opt3).items()}
    assert steps["rack.stacks.0.1.weight"] == 1 and steps["rack.stacks.1.1.weight"] == 4


def test_rebuild_continues_the_exact_trajectory():
    cfg = OptimizerConfig(lr=1e-2)
    a = Tiny()
    b = copy.deepcopy(a)
    opt_a, opt_b = build_optimizer(a, cfg), build_optimizer(b, cfg)
    train(a, opt_a, 2)
    train(b, opt_b, 2)
    opt_b = build_optimizer(b, cfg, previous=opt_b)
    train(a, opt_a, 2, seed=1)
    train(b, opt_b, 2, seed=1)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb), n


def test_prepend_keeps_state_with_the_moved_stack():
    model, cfg = Tiny(), OptimizerConfig()
    opt = build_optimizer(model, cfg)
    train(model, opt, 2)
    old_stack0 = {k: v.clone() for k, v in state_by_name(opt)["rack.stacks.0.1.weight"].items()}
    model.prepend()  # old stack 0 is now named rack.stacks.1
    opt2 = build_optimizer(model, cfg, previous=opt)
    after = state_by_name(opt2)
    assert "rack.stacks.0.1.weight" not in after  # the new stack starts fresh
    assert torch.equal(after["rack.stacks.1.1.weight"]["exp_avg"], old_stack0["exp_avg"])


def test_rebuilt_model_gets_state_by_name():
    model, cfg = Tiny(), OptimizerConfig()
    opt = build_optimizer(model, cfg)
    train(model, opt, 2)
    clone = copy.deepcopy(model)  # new parameter objects, same names and shapes
    opt2 = build_optimizer(clone, cfg, previous=opt)
    before, after = state_by_name(opt), state_by_name(opt2)
    assert set(after) == set(before)
    assert all(torch.equal(after[n]["exp_avg_sq"], before[n]["exp_avg_sq"]) for n in before)


def test_state_only_moves_between_compatible_optimizers():
    model = Tiny()
    opt = build_optimizer(model, OptimizerConfig(optimizer_type="Adam"))
    train(model, opt, 1)
    assert state_by_name(build_optimizer(model, OptimizerConfig(optimizer_type="AdamW"), previous=opt))
    sgd = build_optimizer(model, OptimizerConfig(optimizer_type="SGD"), previous=opt)
    assert state_by_name(sgd) == {}


# ---- spec and helpers ------------------------------------------------------------------------


def test_optimizer_spec_covers_exactly_the_trainable_parameters():
    model = Tiny()
    model.rack.stacks[0].requires_grad_(False)
    cfg = OptimizerConfig(optimizer_type="SGD", lr=LrSchedule(peak=3e-4), momentum=0.5, lr_scale={"embed.*": 0.1})
    spec = optimizer_spec(build_optimizer(model, cfg), cfg)
    spec.validate()
    trainable = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    assert spec.param_names == trainable
    assert sorted(n for names in spec.groups.values() for n in names) == trainable
    assert spec.groups["decay:lr_scale=0.1"] == ["embed.weight"]
    assert (spec.optimizer_type, spec.lr, spec.momentum) == ("SGD", 3e-4, 0.5)


def test_param_names_need_an_optimizer_built_here():
    plain = torch.optim.SGD(Tiny().parameters(), lr=0.1)
    with pytest.raises(ValueError, match="build_optimizer"):
        optimizer_param_names(plain)


def test_clip_grad_norm_reports_and_clips():
    model = Tiny()
    opt = build_optimizer(model, OptimizerConfig())
    model(torch.randint(0, V, (2, 5))).sum().backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    expected = torch.sqrt(sum((g.double() ** 2).sum() for g in grads)).item()
    assert group_grad_norms(opt, None)[0].item() == pytest.approx(expected, rel=1e-5)
    total, groups = group_grad_norms(opt, expected / 4)
    assert total.item() == pytest.approx(expected, rel=1e-5)
    assert groups.shape == (len(opt.param_groups),)
    assert torch.linalg.vector_norm(groups).item() == pytest.approx(expected, rel=1e-5)
    assert group_grad_norms(opt, None)[0].item() == pytest.approx(expected / 4, rel=1e-4)
