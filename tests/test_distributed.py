"""torchrun with 2 ranks on CPU (gloo): DDP and FSDP2 follow the one-process trajectory, growth,
NF4 trunks and QLoRA under FSDP2, sharded checkpoints resumed with another number of ranks,
consolidation, and the safety of sharded checkpoint metadata.

Every torchrun run here is compared with a one-process run of the same config (same global
batch). Tolerance: per-step losses within 1e-4 relative. Summation order differs (per-rank
partial sums, gradient averaging, sharded norms), so the runs agree to float32 rounding, not
bit for bit; measured differences are ~1e-6.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from stackwise.training.checkpoint import CheckpointError, load_dcp
from stackwise.training.loader import ProgressiveDataLoader
from stackwise.training.machine import TrainingMachine

RTOL = 1e-4

BASE = {
    "model": {"d_model": 64, "n_heads": 4, "max_seq_len": 64, "architecture": {"n_stacks": 2, "blocks_per_stack": 1}},
    "training": {"batch_size": 8, "seq_len": 32, "total_steps": 12, "seed": 0, "grad_accum_steps": 2,
                 "optimizer": {"optimizer_type": "AdamW", "lr": 3e-3, "grad_clip": 1.0}},
    "data": {"tokenizer": {"kind": "byte"}, "objective": "clm"},
    # clm, then mlm: the second phase's loss denominators differ from rank to rank.
    "schedule": [{"name": "clm", "start_t": 0.0, "end_t": 0.5},
                 {"name": "mlm", "start_t": 0.5, "end_t": 1.0, "data_config": {"objective": "mlm"}}],
    "run": {"device": "cpu", "log_every": 1, "eval_every": 6, "eval_batches": 3, "checkpoint_every": 4, "keep_last": 10},
}

# Growth under FSDP2: a second stack on an NF4-frozen trunk (activation cache on: forced, as its 48
# draws repeat no sample), then a third with the trunk turned into QLoRA. d_model 128: some NF4
# weights shard over 2 ranks, some stay whole.
GROW = {
    "model": {"d_model": 128, "n_heads": 4, "max_seq_len": 64, "tie_embeddings": False,
              "architecture": {"n_stacks": 1, "blocks_per_stack": 1}},
    "training": {"batch_size": 8, "seq_len": 32, "total_steps": 18, "seed": 0,
                 "optimizer": {"optimizer_type": "AdamW", "lr": 3e-3, "grad_clip": 1.0}},
    "data": {"tokenizer": {"kind": "byte"}, "objective": "clm"},
    "schedule": [
        {"name": "one", "start_t": 0.0, "end_t": 0.34},
        {"name": "two", "start_t": 0.34, "end_t": 0.67,
         "model_config": {"grow": {"n": 1}, "trainable": "new", "trunk": "frozen", "trunk_precision": "nf4"}},
        {"name": "three", "start_t": 0.67, "end_t": 1.0,
         "model_config": {"grow": {"n": 1}, "trainable": "new", "trunk": "qlora", "lora": {"rank": 4}}},
    ],
    "run": {"device": "cpu", "log_every": 1, "eval_every": 6, "eval_batches": 3, "checkpoint_every": 4, "keep_last": 10,
            "activation_cache": True},
}


def _write(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def torchrun(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "stackwise", *args]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=240)


def _ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, proc.stdout[-3000:] + "\n".join(line for line in proc.stderr.splitlines() if "Warning" not in line)[-12000:]


def records(run_dir: Path, kind: str) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def losses(run_dir: Path) -> list[float]:
    steps = records(run_dir, "step")
    assert [r["step"] for r in steps] == list(range(len(steps))), "each step logged exactly once, in order"
    return [r["loss"] for r in steps]


def one_process(config: dict, run_dir: Path) -> Path:
    TrainingMachine(config, run_dir=run_dir, console=False).train()
    return run_dir


def _keep_checkpoints_up_to(run_dir: Path, step: int) -> None:
    """What an interruption right after the checkpoint of `step` leaves behind."""
    for path in (run_dir / "checkpoints").iterdir():
        if int(path.name.split("_")[1]) > step:
            shutil.rmtree(path)


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("dist")


@pytest.fixture(scope="module")
def base_single(work) -> Path:
    return one_process(BASE, work / "base_single")


@pytest.fixture(scope="module")
def grow_single(work) -> Path:
    return one_process(GROW, work / "grow_single")


@pytest.fixture(scope="module")
def grow_fsdp(work) -> Path:
    cfg = _write(GROW, work / "grow.yaml")
    _ok(torchrun("train", str(cfg), f"run.dir={work}", "run.name=grow_fsdp", "run.distributed=fsdp", cwd=work))
    return work / "grow_fsdp"


# ---- the data plane ------------------------------------------------------------------------


def test_rank_slices_make_up_the_global_batch():
    config = {**BASE, "data": {"tokenizer": {"kind": "byte"}, "objective": "mlm"}}
    loader = ProgressiveDataLoader(config)
    whole = loader.batch_at(5)
    parts = [loader.batch_at(5, rank=r, world_size=4) for r in range(4)]
    for field in ("input_ids", "labels", "loss_mask", "loss_weight", "sample_ids"):
        assert torch.equal(torch.cat([getattr(p, field) for p in parts]), getattr(whole, field)), field
    assert sum(p.n_target_tokens for p in parts) == whole.n_target_tokens
    with pytest.raises(ValueError, match="cannot be split evenly over 3 ranks"):
        loader.batch_at(0, rank=0, world_size=3)


# ---- DDP and FSDP2 against one process -----------------------------------------------------


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_ranks_follow_the_one_process_run(mode, work, base_single):
    cfg = _write(BASE, work / "base.yaml")
    proc = torchrun("train", str(cfg), f"run.dir={work}", f"run.name=base_{mode}", f"run.distributed={mode}", cwd=work)
    _ok(proc)
    run = work / f"base_{mode}"
    assert proc.stdout.count("done: 12 steps, 3,072 tokens") == 1, "rank 0 alone reports, counting every rank's tokens"
    np.testing.assert_allclose(losses(run), losses(base_single), rtol=RTOL)
    evals = [(r["step"], r["val_loss"]) for r in records(run, "eval")]
    expected = [(r["step"], r["val_loss"]) for r in records(base_single, "eval")]
    assert [s for s, _ in evals] == [s for s, _ in expected]
    np.testing.assert_allclose([v for _, v in evals], [v for _, v in expected], rtol=RTOL)
    newest = sorted((run / "checkpoints").iterdir())[-1]
    meta = json.loads((newest / "meta.json").read_text())
    assert "dcp/.metadata" in meta["sha256"] and "model.safetensors" not in meta["sha256"]


def test_fsdp_grows_freezes_in_nf4_and_adapts_like_one_process(grow_fsdp, grow_single):
    np.testing.assert_allclose(losses(grow_fsdp), losses(grow_single), rtol=RTOL)
    assert [(t["step"], t["to"]) for t in records(grow_fsdp, "transition")] == [(7, "two"), (13, "three")]
    cache = [r["message"] for r in records(grow_fsdp, "cache")]
    assert cache[1].startswith("activation cache on"), cache
    machine = TrainingMachine.for_evaluation(grow_fsdp)
    assert machine.model.rack.to_spec().precisions == ["nf4", "nf4", "fp32"]
    assert machine.model.rack.to_spec().roles == ["adapted", "adapted", "trainable"]


# ---- sharded checkpoints across world sizes --------------------------------------------------


def test_two_rank_checkpoint_resumes_in_one_process(grow_fsdp, grow_single, work):
    run = work / "resume_2_to_1"
    shutil.copytree(grow_fsdp, run)
    _keep_checkpoints_up_to(run, 8)  # mid-phase, with an NF4 trunk sharded over 2 ranks
    result = TrainingMachine(run / "config.yaml", resume=run, console=False).train()
    assert result.steps == 18
    np.testing.assert_allclose(losses(run), losses(grow_fsdp), rtol=RTOL)
    np.testing.assert_allclose(losses(run), losses(grow_single), rtol=RTOL)


def test_one_process_checkpoint_resumes_with_two_ranks(grow_single, work):
    run = work / "resume_1_to_2"
    shutil.copytree(grow_single, run)
    _keep_checkpoints_up_to(run, 12)  # the next transition (to QLoRA) happens under FSDP2
    _ok(torchrun("train", "--resume", str(run), "run.distributed=fsdp", cwd=work))
    np.testing.assert_allclose(losses(run), losses(grow_single), rtol=RTOL)
    assert len(records(run, "resume")) == 1


def test_consolidate_writes_the_one_process_format(grow_fsdp, work):
    from stackwise.cli import main
    from stackwise.training.checkpoint import load_checkpoint

    out = work / "consolidated"
    assert main(["consolidate", str(grow_fsdp), "--out", str(out)]) == 0
    (step_dir,) = (out / "checkpoints").iterdir()
    ckpt = load_checkpoint(step_dir)
    assert not ckpt.sharded and "model.safetensors" in ckpt.meta["sha256"]
    sharded, whole = TrainingMachine.for_evaluation(grow_fsdp), TrainingMachine.for_evaluation(out)
    for (name, a), (_, b) in zip(sharded.model.state_dict().items(), whole.model.state_dict().items(), strict=True):
        a = a.get_original_weight() if hasattr(a, "get_original_weight") else a
        b = b.get_original_weight() if hasattr(b, "get_original_weight") else b
        assert torch.equal(a, b), name
    assert sharded.evaluate() == whole.evaluate()
    assert main(["consolidate", str(grow_fsdp), "--out", str(out)]) == 2  # never over an existing folder


# ---- user errors and safety ------------------------------------------------------------------


def test_a_batch_that_does_not_split_over_the_ranks_is_a_clear_error(work):
    config = {**BASE, "training": {**BASE["training"], "batch_size": 6}}
    cfg = _write(config, work / "odd.yaml")
    proc = torchrun("train", str(cfg), f"run.dir={work}", "run.name=odd", cwd=work)
    assert proc.returncode != 0
    assert "make training.batch_size (and any phase data_config.batch_size) a multiple of 4" in proc.stderr
    assert "stackwise train: phase 'clm': batch size 6 does not split into 2 ranks × 2 micro-batches" in proc.stderr


class _Payload:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_sharded_checkpoint_metadata_cannot_run_code(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "dcp"
    folder.mkdir()
    (folder / ".metadata").write_bytes(pickle.dumps(_Payload()))
    with pytest.raises(CheckpointError, match="refused"):
        load_dcp(folder, {"model": {}})
    assert not (tmp_path / "pwned").exists()
