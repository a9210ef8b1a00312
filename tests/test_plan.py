"""The memory planner: shapes-only estimates, precision-aware weights, and the 70B-shaped plans."""

from pathlib import Path

import pytest
import torch

from stackwise.cli import main
from stackwise.cli.plan import plan_rows
from stackwise.config import StackWiseConfig
from stackwise.model import StackWiseModel
from stackwise.training.memory import (
    NF4_BYTES_PER_VALUE,
    block_activation_values,
    estimate_phase,
    weight_bytes,
)
from stackwise.training.progressive import ProgressiveRackBuilder

ROOT = Path(__file__).resolve().parents[1]
PLANS = ROOT / "examples" / "plans"


def model_cfg(**model):
    return StackWiseConfig.from_dict({"model": {"d_model": 64, "n_heads": 4, "vocab_size": 300, **model},
                                      "training": {"seq_len": 32}, "data": {}})


def test_weights_count_each_precision():
    builder = ProgressiveRackBuilder(model_cfg(architecture={"n_stacks": 3, "blocks_per_stack": 1}))
    dense = weight_bytes(builder.model)
    assert dense == 4 * sum(p.numel() for p in builder.model.parameters())
    linears = sum(m.weight.numel() for m in builder.rack[0].modules() if isinstance(m, torch.nn.Linear))
    builder.freeze([0], precision="nf4")
    assert weight_bytes(builder.model) == pytest.approx(dense - linears * (4 - NF4_BYTES_PER_VALUE))


def test_estimate_terms_follow_the_formulas():
    cfg = model_cfg(architecture={"n_stacks": 2, "blocks_per_stack": 2})
    model = StackWiseModel(cfg.model)
    est = estimate_phase(model, batch_size=4, seq_len=32, objective="clm", mask_fraction=1.0, optimizer_type="AdamW")
    trainable = sum(p.numel() for p in model.parameters())
    assert est.gradients == 4 * trainable and est.optimizer == 8 * trainable
    per_token = 11 * 64 + 4 * cfg.model.ffn_hidden + 4 + 2
    assert block_activation_values(cfg.model, 32) == per_token
    assert est.activations == pytest.approx(4 * 128 * per_token * 4 + 128 * (2 * 64 + 1) * 4)
    # fused head + loss: 128 rows in one chunk (fp32 logits), the rows' gradient; the head's
    # gradient becomes its .grad (counted in gradients) ...
    assert est.loss == 128 * 300 * 4 + 128 * 64 * 4
    masked = estimate_phase(model, batch_size=4, seq_len=32, objective="mlm", mask_fraction=0.15, optimizer_type="SGD", momentum=0.0)
    assert masked.loss == pytest.approx(19 * 300 * 4 + 0.15 * 128 * 64 * 4) and masked.optimizer == 0
    # ... unless it is added to an earlier micro-batch's (64 rows per micro-batch)
    accum = estimate_phase(model, batch_size=4, seq_len=32, objective="clm", mask_fraction=1.0, optimizer_type="AdamW",
                           grad_accum_steps=2)
    assert accum.loss == 64 * 300 * 4 + 64 * 64 * 4 + 300 * 64 * 4


def test_plan_memory_shrinks_for_a_frozen_trunk(tmp_path):
    cfg = model_cfg(architecture={"n_stacks": 4, "blocks_per_stack": 1}).with_overrides(
        ["training.total_steps=10", "model.tie_embeddings=false"])  # tied, the embedding would train with its head
    e2e = plan_rows(cfg, 10)[0]["memory"]
    frozen = cfg.with_overrides(['schedule=[{"name": "top", "start_t": 0, "end_t": 1, "model_config": {"trainable": "last:1"}}]'])
    top = plan_rows(frozen, 10)[0]["memory"]
    assert top.gradients < e2e.gradients / 2 and top.activations < e2e.activations / 2


def test_70b_plans_show_what_fits(capsys):
    assert main(["plan", str(PLANS / "llama70b_progressive.yaml"), "--memory", "--no-data"]) == 0
    progressive = capsys.readouterr().out
    assert main(["plan", str(PLANS / "llama70b_end_to_end.yaml"), "--memory", "--no-data"]) == 0
    end_to_end = capsys.readouterr().out
    last_peak = float([line for line in progressive.splitlines() if line.startswith("stacks80")][-1].split()[-1])
    e2e_peak = float([line for line in end_to_end.splitlines() if line.startswith("main")][-1].split()[-1])
    assert 60 < last_peak < 141 < e2e_peak  # stack by stack fits one 141 GB GPU; end to end does not
    assert "stacks80" in progressive and "70.55B" in progressive


def test_plan_on_cpu_counts_the_cache(tmp_path, capsys):
    config = ROOT / "examples" / "grow_l2r.yaml"
    assert main(["plan", str(config), "--memory", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    cache_column = [line.split()[8] for line in out.splitlines() if line.startswith("stacks")][4:]
    assert cache_column[0] == "0.00" and all(float(c) > 0 for c in cache_column[1:])
