"""Training FLOPs (docs/training.md, "Compute (FLOPs)"): the `flops` of every step record equal a
count by hand, for every kind of phase; the count survives resume; plot and plan use it.

The expected values are written out here from the formulas, never asked of training/flops.py:
per token, a block's forward is F = 2·P + 2·T·d; a trained block costs 3·2P + 3·2Td, a frozen one
above a trainable one 2·2P + 3·2Td, a frozen trunk below the trainable stacks 2P + 2Td (0 on a
cache hit); LoRA adapters 3·2·P_lora; the head 2Vd + 2Vd (input gradient) + 2Vd (when it trains)
per scored position; each NF4 weight is decoded once per use (forward, and backward above the
trunk) per micro-batch.
"""

import itertools
import json

import pytest
import torch

from stackwise.cli.plan import plan_rows
from stackwise.cli.plot import PlotError, plot_data
from stackwise.config import StackWiseConfig
from stackwise.training import TrainingMachine
from tests.runs import cli

D, FFN, T, B = 32, 64, 16, 4
P = 4 * D * D + 3 * D * FFN  # q, k, v, o (n_kv_heads = n_heads) and SwiGLU gate, up, down


def trained(p=P):
    return 3 * 2 * p + 3 * 2 * T * D


def frozen_above(p=P):
    return 2 * 2 * p + 3 * 2 * T * D


def frozen_below(p=P):
    return 2 * p + 2 * T * D


def head(vocab, trains=True, below_trains=True):
    return 2 * vocab * D * (1 + below_trains + trains)


def config(tmp_path, schedule, steps=8, data=None, **run):
    return {
        "model": {"d_model": D, "n_heads": 2, "ffn_hidden": FFN, "max_seq_len": T, "tie_embeddings": False,
                  "architecture": {"n_stacks": 2, "blocks_per_stack": 1}},
        "training": {"batch_size": B, "seq_len": T, "total_steps": steps, "optimizer": {"lr": 1e-3}, "seed": 5},
        "data": data or {"use_dummy_data": True},
        "schedule": schedule,
        "run": {"dir": str(tmp_path / "runs"), "name": "run", "log_every": 1, "eval_every": 1000, "eval_batches": 1,
                "checkpoint_at_transitions": False, **run},
    }


def records(run_dir, kind="step"):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def step_flops(run_dir):
    """Each logged step's own FLOPs (the differences of the cumulative counts)."""
    totals = [0.0] + [r["flops"] for r in records(run_dir)]
    return [b - a for a, b in itertools.pairwise(totals)]


def train(cfg, **kwargs):
    machine = TrainingMachine(cfg, console=False, **kwargs)
    machine.train()
    return machine


def test_end_to_end_step_is_three_forwards_of_every_block_and_the_head(tmp_path):
    machine = train(config(tmp_path, [{"name": "all", "start_t": 0.0, "end_t": 1.0}], steps=3))
    vocab = machine.model.vocab_size
    per_step = B * T * (2 * trained() + head(vocab))
    assert step_flops(machine.run_dir) == [per_step] * 3
    assert records(machine.run_dir, "eval")[-1]["flops"] == 3 * per_step


def test_frozen_trunk_without_cache_runs_forward_only(tmp_path):
    schedule = [{"name": "top", "start_t": 0.0, "end_t": 1.0, "model_config": {"trainable": "last:1"}}]
    machine = train(config(tmp_path, schedule, steps=3, activation_cache=False))
    vocab = machine.model.vocab_size
    assert not machine.model.embedding.tokens.weight.requires_grad
    per_step = B * T * (frozen_below() + trained() + head(vocab))
    assert step_flops(machine.run_dir) == [per_step] * 3
    assert "cache_hit_rate" not in records(machine.run_dir)[-1]


def test_cached_trunk_rows_cost_nothing(tmp_path):
    """A multi-epoch phase over a corpus of a few windows: from the second epoch the cache serves
    whole batches, and those steps cost the top stack and the head alone."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"doc{i}.txt").write_text(f"document {i}: " + "stack the rack, grow the trunk. " * 3 + "\n")
    schedule = [{"name": "top", "start_t": 0.0, "end_t": 1.0, "model_config": {"trainable": "last:1"}}]
    cfg = config(tmp_path, schedule, steps=12, data={"paths": [str(corpus)], "tokenizer": {"kind": "byte"}},
                 activation_cache=True)
    machine = train(cfg)
    vocab = machine.model.vocab_size
    miss = B * T * (frozen_below() + trained() + head(vocab))
    hit = B * T * (trained() + head(vocab))
    flops = step_flops(machine.run_dir)
    rates = [r["cache_hit_rate"] for r in records(machine.run_dir)]
    assert all((f, r) in ((miss, 0.0), (hit, 1.0)) for f, r in zip(flops, rates, strict=True)), (flops, rates)
    assert rates.count(1.0) >= 3, rates  # real hits: the corpus holds a few windows, the phase many epochs
    assert records(machine.run_dir)[-1]["flops"] == rates.count(1.0) * hit + rates.count(0.0) * miss


def test_a_stack_prepended_under_a_frozen_trunk_backpropagates_through_it(tmp_path):
    schedule = [
        {"name": "one", "start_t": 0.0, "end_t": 0.5},
        {"name": "under", "start_t": 0.5, "end_t": 1.0,
         "model_config": {"grow": {"n": 1, "where": "prepend", "init": "identity"}, "trainable": "new"}},
    ]
    machine = train(config(tmp_path, schedule, steps=4))
    vocab = machine.model.vocab_size
    assert [s.role for s in machine.model.rack] == ["trainable", "frozen", "frozen"]
    first = B * T * (2 * trained() + head(vocab))
    # The new bottom stack trains (and the embedding with it); the two above run forward and backward.
    second = B * T * (trained() + 2 * frozen_above() + head(vocab))
    assert step_flops(machine.run_dir) == [first] * 2 + [second] * 2


def test_qlora_trunk_counts_its_base_adapters_and_nf4_decodes(tmp_path):
    rank = 4
    schedule = [
        {"name": "one", "start_t": 0.0, "end_t": 0.5},
        {"name": "qlora", "start_t": 0.5, "end_t": 1.0,
         "model_config": {"grow": {"n": 1, "where": "append", "init": "identity"}, "trainable": "new", "trunk": "qlora",
                          "lora": {"rank": rank}}},
    ]
    machine = train(config(tmp_path, schedule, steps=4, activation_cache=False))
    vocab = machine.model.vocab_size
    assert [s.role for s in machine.model.rack] == ["adapted", "adapted", "trainable"]
    # Every linear adapted: q, k, v, o (D → D), gate and up (D → FFN), down (FFN → D).
    p_lora = rank * (4 * (D + D) + 3 * (D + FFN))
    adapted = frozen_above() + 3 * 2 * p_lora
    nf4_decodes = 2 * 2 * P  # two NF4 stacks' weights, decoded in forward and in backward, once a step
    first = B * T * (2 * trained() + head(vocab))
    second = B * T * (2 * adapted + trained() + head(vocab)) + nf4_decodes
    # The first QLoRA phase adapts the two old stacks and trains a new one on top.
    assert step_flops(machine.run_dir) == [first] * 2 + [second] * 2


def test_mlm_head_scores_only_the_masked_positions(tmp_path):
    schedule = [{"name": "mlm", "start_t": 0.0, "end_t": 1.0, "data_config": {"objective": "mlm", "mask_rate": 0.25}}]
    machine = train(config(tmp_path, schedule, steps=3))
    vocab = machine.model.vocab_size
    phase = machine.schedule.phases[0]
    masked = [int(machine.data.batch(s, phase.local_time(s / 3)).loss_mask.sum()) for s in range(3)]
    assert 0 < sum(masked) < 3 * B * T
    expected = [B * T * 2 * trained() + m * head(vocab) for m in masked]  # every position through the rack
    assert step_flops(machine.run_dir) == expected


def growth(tmp_path, steps=8, **run):
    schedule = [
        {"name": "one", "start_t": 0.0, "end_t": 0.5},
        {"name": "two", "start_t": 0.5, "end_t": 1.0,
         "model_config": {"grow": {"n": 1, "where": "append", "init": "identity"}, "trainable": "new"}},
    ]
    return config(tmp_path, schedule, steps=steps, checkpoint_at_transitions=True, eval_every=3, **run)


def test_cumulative_flops_survive_resume_exactly(tmp_path):
    full = train(growth(tmp_path / "a"))
    first = TrainingMachine(growth(tmp_path / "b"), console=False)
    for _ in range(3):  # a checkpoint in phase one; the run ends in phase two
        first.train_step()
    first.save_checkpoint()
    first.close()
    resumed = train(growth(tmp_path / "b"), resume=first.run_dir)
    for kind in ("step", "eval"):
        expected = [(r["step"], r["flops"]) for r in records(full.run_dir, kind)]
        assert [(r["step"], r["flops"]) for r in records(resumed.run_dir, kind)] == expected
    assert resumed.flops.total == full.flops.total > 0


def test_plot_x_flops_spans_the_run_and_old_runs_say_why_not(tmp_path, capsys):
    machine = train(growth(tmp_path))
    total = records(machine.run_dir)[-1]["flops"]
    data = plot_data(machine.run_dir, "flops")
    assert data.x_range == (0.0, total) and max(data.train[0]) == total
    (one, start, boundary), (two, boundary_too, end) = data.bands
    assert (one, two, start, end) == ("one", "two", 0.0, total)
    halfway = next(r["flops"] for r in records(machine.run_dir) if r["step"] == 3)  # after phase one's 4 steps
    assert boundary == boundary_too == halfway == data.transitions[0][1]
    assert data.val[0] == [r["flops"] for r in records(machine.run_dir, "eval")]
    assert plot_data(machine.run_dir, "step").x_range == (0.0, 8.0)
    assert plot_data(machine.run_dir, "time").x_range[1] == records(machine.run_dir)[-1]["wall_s"]
    code, _, _ = cli(["plot", str(machine.run_dir), "--x", "flops", "--out", str(tmp_path / "f.png")], capsys)
    assert code == 0 and (tmp_path / "f.png").stat().st_size > 0
    # A run logged before FLOPs were counted: one line naming the field and the axes it can use.
    path = machine.run_dir / "metrics.jsonl"
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "flops"}) + "\n" for r in lines))
    with pytest.raises(PlotError, match=r"no `flops`.*--x t, step, tokens, time"):
        plot_data(machine.run_dir, "flops")
    code, _, err = cli(["plot", str(machine.run_dir), "--x", "flops"], capsys)
    assert code != 0 and len(err.strip().splitlines()) == 1


def test_plan_shows_phase_flops_next_to_end_to_end(tmp_path, capsys):
    cfg = growth(tmp_path)
    rows = plan_rows(StackWiseConfig.from_dict(cfg), 8)
    vocab = 512  # dummy data's vocabulary
    one = 4 * B * T * (2 * trained() + head(vocab))  # phase one: two stacks train, 4 steps
    two = 4 * B * T * (2 * frozen_below() + trained() + head(vocab))  # a third on the frozen two
    final = 4 * B * T * (3 * trained() + head(vocab))  # the final three-stack model, end to end, per phase
    assert [r["compute"]["flops"] for r in rows] == [one, two]
    assert [r["compute"]["end_to_end"] for r in rows] == [final, final]
    path = tmp_path / "growth.yaml"
    path.write_text(StackWiseConfig.from_dict(cfg).to_yaml())
    code, out, _ = cli(["plan", str(path)], capsys)
    assert code == 0
    header = out.splitlines()[0].split()
    assert {"steps", "tokens", "mem_GiB", "flops", "e2e_flops"} <= set(header)
    assert f"ratio {(one + two) / (2 * final):.3f}" in out


def test_no_device_sync_is_needed_to_count(tmp_path):
    """The count reads host values only: a batch's loss mask is on the host."""
    schedule = [{"name": "mlm", "start_t": 0.0, "end_t": 1.0, "data_config": {"objective": "mlm"}}]
    machine = TrainingMachine(config(tmp_path, schedule, steps=2), run_dir=False, console=False)
    batch = machine.data.batch(0, 0.0)
    assert batch.loss_mask.device == torch.device("cpu")


def test_mfu_uses_the_peak_table_and_shows_on_the_log_line(monkeypatch):
    import io

    from stackwise.training.flops import peak_flops
    from stackwise.training.logger import MetricsLogger

    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    assert peak_flops(cuda, torch.bfloat16) == pytest.approx(989.4e12)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert peak_flops(cuda, None) == pytest.approx(494.7e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    assert peak_flops(cuda, torch.bfloat16) == pytest.approx(312e12)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Some Future GPU")
    assert peak_flops(cuda, torch.bfloat16) is None
    assert peak_flops(torch.device("cpu"), None) is None
    stream = io.StringIO()
    MetricsLogger(None, 10, stream=stream).step(step=0, t=0.0, phase="p", loss=1.0, lr=1e-3, mfu=0.413)
    assert "MFU 41.3%" in stream.getvalue()
