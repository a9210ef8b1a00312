"""Models in and out, end to end: export → import is bit-identical, and the two shipped recipes
(examples/llama_pro.yaml, examples/upscale.yaml) run on a tiny random Llama made here, train, and
export to a deeper Llama that transformers loads with our logits."""

from pathlib import Path

import pytest
import torch

from stackwise.cli import main
from stackwise.config import StackWiseConfig
from stackwise.interop.dense import dense_hf_state
from stackwise.training import TrainingMachine
from tests.hf_models import hf_model, text_ids

transformers = pytest.importorskip("transformers", reason="the interop tests build tiny models with transformers (dev lock)")

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["training.batch_size=4", "training.seq_len=32", "model.max_seq_len=64", "run.eval_batches=1",
         "run.log_every=1", "run.eval_every=100"]


def logits(model, ids):
    with torch.no_grad():
        return model(ids)


def test_export_then_import_gives_bit_identical_weights(tmp_path):
    config = {
        "model": {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "tie_embeddings": False, "max_seq_len": 64,
                  "architecture": {"n_stacks": 2, "blocks_per_stack": 1}},
        "training": {"batch_size": 4, "seq_len": 32, "total_steps": 3},
        "data": {}, "run": {"dir": str(tmp_path), "name": "src", "eval_batches": 1},
    }
    source = TrainingMachine(config, console=False)
    source.train()
    assert main(["export", str(source.run_dir), "--hf", str(tmp_path / "hf")]) == 0
    back = TrainingMachine({**config, "model": {"init_from": str(tmp_path / "hf")}, "run": {"dir": str(tmp_path)}},
                           console=False)
    before, after = dense_hf_state(source.model), dense_hf_state(back.model)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert back.data.tokenizer.encode("héllo") == source.data.tokenizer.encode("héllo")


def run_recipe(tmp_path, example, *extra):
    hf = hf_model(tmp_path / "base", layers=8)
    config = StackWiseConfig.from_yaml(ROOT / "examples" / example).with_overrides(
        [*SMALL, f"model.init_from={tmp_path / 'base'}", f"run.dir={tmp_path}", "training.total_steps=4", *extra])
    machine = TrainingMachine(config, console=False)
    ids = text_ids(machine.data.tokenizer, n=32)
    imported = logits(machine.model, ids)
    assert float((imported[..., : hf.config.vocab_size] - logits(hf, ids).logits).abs().max()) < 1e-5
    machine.planes  # noqa: B018 - enters the first phase: the rack grows
    return hf, machine, ids, imported


def exported_logits(tmp_path, machine, ids):
    assert main(["export", str(machine.run_dir), "--hf", str(tmp_path / "out")]) == 0
    out = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        return out, out(ids).logits


def test_llama_pro_recipe(tmp_path):
    _, machine, ids, imported = run_recipe(tmp_path, "llama_pro.yaml")
    # 8 layers in stacks of 4, a one-block identity stack after every 4: [4, 1, 4, 1].
    assert [len(stack) for stack in machine.model.rack] == [4, 1, 4, 1]
    assert float((logits(machine.model, ids) - imported).abs().max()) < 1e-6  # function unchanged
    frozen = {n: p.detach().clone() for n, p in machine.model.named_parameters() if not p.requires_grad}
    result = machine.train()
    assert result.steps == 4 and result.final_val_loss is not None
    trained = [s.role for s in machine.model.rack]
    assert trained == ["frozen", "trainable", "frozen", "trainable"]
    assert all(torch.equal(p, frozen[n]) for n, p in machine.model.named_parameters() if n in frozen)
    out, theirs = exported_logits(tmp_path, machine, ids)
    assert out.config.num_hidden_layers == 10
    assert float((logits(machine.model, ids)[..., : theirs.shape[-1]] - theirs).abs().max()) < 1e-5


def test_upscale_recipe(tmp_path):
    hf, machine, ids, _ = run_recipe(tmp_path, "upscale.yaml", "schedule.0.model_config.grow.trim=2")
    # SOLAR's operator on 8 layers with trim 2: layers 0..5, then a copy of layers 2..7.
    assert [len(stack) for stack in machine.model.rack] == [6, 6]
    layers = hf.model.layers
    grown = [block for stack in machine.model.rack for block in stack.blocks]
    order = [*range(6), *range(2, 8)]
    assert all(torch.equal(b.attention.q.weight, layers[i].self_attn.q_proj.weight) for b, i in zip(grown, order, strict=True))
    machine.train()
    out, theirs = exported_logits(tmp_path, machine, ids)
    assert out.config.num_hidden_layers == 12
    assert float((logits(machine.model, ids)[..., : theirs.shape[-1]] - theirs).abs().max()) < 1e-5


def test_plan_reads_the_imported_shapes(tmp_path, capsys):
    hf_model(tmp_path / "base", layers=8)
    code = main(["plan", str(ROOT / "examples" / "llama_pro.yaml"), f"model.init_from={tmp_path / 'base'}",
                 "training.seq_len=32", "model.max_seq_len=64", "--no-data"])
    out = capsys.readouterr().out
    assert code == 0 and "expand" in out
    header, *_ = out.splitlines()
    row = next(line.split() for line in out.splitlines() if line.startswith("expand"))
    columns = dict(zip(header.split(), row, strict=False))
    # 8 imported layers in 2 stacks of 4, plus a one-block stack after each: 4 stacks, 10 blocks.
    assert (columns["stacks"], columns["blocks"]) == ("4", "10")
