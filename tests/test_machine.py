"""The TrainingMachine: transitions, optimizer carry-over, exact resume, checkpoint fallback."""

import json

import pytest
import torch

from stackwise.config import ConfigError
from stackwise.training import TrainingMachine
from stackwise.training.checkpoint import CheckpointManager
from stackwise.training.machine import TrainingError


def tiny_config(tmp_path, **run):
    return {
        "model": {"d_model": 32, "n_heads": 2, "architecture": {"n_stacks": 2, "blocks_per_stack": 1}, "max_seq_len": 64},
        "training": {"batch_size": 4, "seq_len": 32, "optimizer": {"lr": 2e-3}, "seed": 3},
        "data": {},
        "schedule": [
            {"name": "both", "start_t": 0.0, "end_t": 0.5},
            {"name": "top", "start_t": 0.5, "end_t": 1.0, "model_config": {"trainable": "last:1"},
             "optimizer_config": {"lr": {"schedule": "cosine", "peak": 2e-3, "final": 2e-4, "warmup": 0.2}}},
        ],
        "run": {"dir": str(tmp_path / "runs"), "eval_every": 6, "eval_batches": 2, "log_every": 4, **run},
    }


def params(machine):
    return {n: p.detach().clone() for n, p in machine.model.state_dict().items()}


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_one_transition_at_the_right_step(tmp_path):
    machine = TrainingMachine(tiny_config(tmp_path), total_steps=12, console=False)
    result = machine.train()
    assert [(tr.step, tr.t, tr.from_phase, tr.to_phase) for tr in result.transitions] == [(6, 0.5, "both", "top")]
    events = [r for r in metrics(machine.run_dir) if r["kind"] == "transition"]
    assert len(events) == 1 and events[0]["step"] == 6 and events[0]["from"] == "both"
    steps = [r["step"] for r in metrics(machine.run_dir) if r["kind"] == "step"]
    assert steps == sorted(set(steps)) and steps[-1] == 11
    assert result.steps == 12 and result.tokens_seen == 12 * 4 * 32
    assert result.final_val_loss is not None and result.final_val_bpb > 0
    assert len(result.losses) == 12


def test_phase_roles_freeze_the_bottom_stack_and_it_does_not_change(tmp_path):
    machine = TrainingMachine(tiny_config(tmp_path), total_steps=12, run_dir=False, console=False)
    for _ in range(7):  # into phase "top"
        machine.train_step()
    assert machine.phase.name == "top"
    bottom = {n: p.detach().clone() for n, p in machine.model.rack[0].named_parameters()}
    assert not any(p.requires_grad for p in machine.model.rack[0].parameters())
    # below the trunk, but tied to the head, which trains: it trains too (docs/training.md)
    assert machine.model.tied and machine.model.embedding.tokens.weight.requires_grad
    while machine.step < 12:
        machine.train_step()
    for n, p in machine.model.rack[0].named_parameters():
        assert torch.equal(p, bottom[n]) and p.grad is None


def test_optimizer_state_carries_over_across_the_boundary(tmp_path):
    machine = TrainingMachine(tiny_config(tmp_path), total_steps=12, run_dir=False, console=False)
    for _ in range(6):
        machine.train_step()
    top_param = machine.model.rack[1].blocks[0].mlp.up.weight
    before = {k: v.clone() for k, v in machine.optim.optimizer.state[top_param].items()}
    machine.train_step()  # enters "top": the optimizer is rebuilt
    optimizer = machine.optim.optimizer
    names = {n for g in optimizer.param_groups for n in g["names"]}
    assert not any(n.startswith("rack.stacks.0.") for n in names)
    # The surviving parameter kept its moments: one more step from the carried state, not fresh.
    assert optimizer.state[top_param]["step"].item() == before["step"].item() + 1
    assert not torch.equal(optimizer.state[top_param]["exp_avg_sq"], torch.zeros_like(before["exp_avg_sq"]))


def test_lr_follows_the_phase_shape(tmp_path):
    machine = TrainingMachine(tiny_config(tmp_path), total_steps=20, run_dir=False, console=False)
    lrs = [machine.train_step()["lr"] for _ in range(20)]
    assert lrs[:10] == [2e-3] * 10
    # Phase "top": 10 steps, τ = 0, 0.1, ...; warmup over τ < 0.2, then cosine 2e-3 → 2e-4.
    assert lrs[10] == 0.0 and lrs[11] == pytest.approx(1e-3)
    assert lrs[12] == pytest.approx(2e-3)
    assert lrs[16] == pytest.approx(2e-4 + 0.5 * 1.8e-3 * (1 + torch.cos(torch.tensor(torch.pi * 0.5)).item()))


def test_resume_is_bit_identical_to_an_uninterrupted_run(tmp_path):
    full = TrainingMachine(tiny_config(tmp_path / "a"), total_steps=16, console=False)
    full_result = full.train()

    first = TrainingMachine(tiny_config(tmp_path / "b"), total_steps=16, console=False)
    for _ in range(5):  # stop inside phase "both"; the run ends in phase "top"
        first.train_step()
    first.save_checkpoint()
    first.log.close()
    del first
    resumed = TrainingMachine(tiny_config(tmp_path / "b"), total_steps=16, resume=tmp_path / "b" / "runs" / "run", console=False)
    assert resumed.step == 5
    result = resumed.train()
    assert result.losses == full_result.losses
    for name, tensor in params(full).items():
        assert torch.equal(tensor, params(resumed)[name]), name
    steps = [r["step"] for r in metrics(resumed.run_dir) if r["kind"] == "step"]
    assert len(steps) == len(set(steps))  # nothing logged twice
    assert [r["step"] for r in metrics(resumed.run_dir) if r["kind"] == "transition"] == [8]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    reference = TrainingMachine(tiny_config(tmp_path / "a"), total_steps=12, console=False).train()
    machine = TrainingMachine(tiny_config(tmp_path / "b", checkpoint_every=3, checkpoint_at_transitions=False),
                              total_steps=12, console=False)
    for _ in range(9):
        machine.train_step()
    machine.log.close()
    manager = CheckpointManager(machine.run_dir)
    assert [p.name for p in manager.list()] == ["step_000003", "step_000006", "step_000009"]
    weights = manager.list()[-1] / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # truncated by a crash
    cfg = tiny_config(tmp_path / "b", checkpoint_every=3, checkpoint_at_transitions=False)
    resumed = TrainingMachine(cfg, total_steps=12, resume=machine.run_dir, console=False)
    assert resumed.step == 6
    assert resumed.train().losses == reference.losses


def test_resume_of_a_run_without_checkpoints_is_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="nothing to resume"):
        TrainingMachine(tiny_config(tmp_path), total_steps=4, resume=tmp_path / "empty", console=False)


def test_a_phase_too_short_for_one_step_is_a_config_error(tmp_path):
    cfg = tiny_config(tmp_path)
    cfg["schedule"][0]["end_t"] = 0.52
    cfg["schedule"][1]["start_t"] = 0.58
    cfg["schedule"].insert(1, {"name": "blink", "start_t": 0.52, "end_t": 0.58})  # holds no k/10
    with pytest.raises(ConfigError, match=r"schedule\.1"):
        TrainingMachine(cfg, total_steps=10, run_dir=False, console=False)


def test_runs_never_overwrite_each_other(tmp_path):
    a = TrainingMachine(tiny_config(tmp_path), total_steps=2, console=False)
    a.train()
    b = TrainingMachine(tiny_config(tmp_path), total_steps=2, console=False)
    assert a.run_dir != b.run_dir and b.run_dir.name == "run-2"
    b.log.close()


def test_grad_accumulation_matches_one_big_batch(tmp_path):
    # SGD: the update is proportional to the gradient, so equal gradients give equal weights
    # (Adam's normalized update would magnify float noise in near-zero gradients).
    base = tiny_config(tmp_path)
    base["training"]["optimizer"] = {"optimizer_type": "SGD", "lr": 0.5, "momentum": 0.0}
    one = TrainingMachine(base, total_steps=3, run_dir=False, console=False)
    cfg = {**base, "training": {**base["training"], "grad_accum_steps": 2}}
    two = TrainingMachine(cfg, total_steps=3, run_dir=False, console=False)
    for _ in range(3):
        a, b = one.train_step()["loss"], two.train_step()["loss"]
        assert a.item() == pytest.approx(b.item(), rel=1e-5)
    for (n, p), q in zip(one.model.named_parameters(), two.model.parameters(), strict=True):
        assert torch.allclose(p, q, atol=1e-6), n


def test_compiled_stacks_train_like_eager_ones(tmp_path):
    # run.compile compiles each stack, including stacks grown (here: copied) at a phase boundary.
    cfg = tiny_config(tmp_path)
    cfg["schedule"][1]["model_config"] = {"grow": {"n": 1, "init": "copy"}, "trainable": "new"}
    eager = TrainingMachine(cfg, total_steps=6, run_dir=False, console=False).train()
    cfg["run"]["compile"] = True
    machine = TrainingMachine(cfg, total_steps=6, run_dir=False, console=False)
    compiled = machine.train()
    assert all(getattr(stack, "_compiled_call_impl", None) is not None for stack in machine.model.rack)
    assert compiled.losses == pytest.approx(eager.losses, rel=1e-5)
