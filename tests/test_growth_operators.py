"""Growth operators beyond append/prepend: interleaved stacks (LLaMA Pro), depth up-scaling
(SOLAR) and whole-rack stacking (G_stack). Block orders by hand, function preservation, errors
that name the field, training on the machine (frozen and QLoRA trunks), exact resume, and plan."""

import pytest
import torch
import yaml

from stackwise.cli import main
from stackwise.cli.plan import plan_rows
from stackwise.config import ConfigError, StackWiseConfig
from stackwise.model.layers import block_param_count
from stackwise.model.lora import LoRALinear
from stackwise.model.quant import dequantize
from stackwise.training import ProgressiveRackBuilder, TrainingMachine
from stackwise.training.progressive import apply_model_phase
from tests.runs import write_small_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_small_corpus(tmp_path_factory.mktemp("corpus"))


def model_config(sizes, **model):
    return {"d_model": 32, "n_heads": 2, "max_seq_len": 32, "tie_embeddings": False,
            "architecture": {"n_stacks": len(sizes), "blocks_per_stack": sizes}, **model}


def labelled(sizes):
    """A builder whose blocks carry their original index in attn_norm.weight."""
    cfg = StackWiseConfig.from_dict({"model": model_config(sizes, vocab_size=64), "training": {"seq_len": 32}, "data": {}})
    builder = ProgressiveRackBuilder(cfg)
    blocks = [block for stack in builder.rack for block in stack.blocks]
    with torch.no_grad():
        for i, block in enumerate(blocks):
            block.attn_norm.weight.fill_(i)
    return builder


def order(builder):
    """The rack as nested lists of original block indices, one list per stack."""
    return [[int(block.attn_norm.weight[0]) for block in stack.blocks] for stack in builder.rack]


def logits(model, ids):
    model.eval()
    with torch.no_grad():
        return model(ids)


# ---- block orders, by hand ----------------------------------------------------------------------


@pytest.mark.parametrize(("trim", "expected", "ids", "new"), [
    (2, [[0, 1, 2, 3], [4, 5], [2, 3], [4, 5, 6, 7]], ["0", "1", "2", "3"], [2, 3]),  # [0..5] + [2..7]
    (3, [[0, 1, 2, 3], [4], [3], [4, 5, 6, 7]], ["0", "1", "2", "3"], [2, 3]),  # partial stacks
    (5, [[0, 1, 2], [5, 6, 7]], ["0", "2"], [1]),  # stack 1 trimmed away, the copy of stack 0 too
    (0, [[0, 1, 2, 3], [4, 5, 6, 7], [0, 1, 2, 3], [4, 5, 6, 7]], ["0", "1", "2", "3"], [2, 3]),
])
def test_upscale_gives_the_solar_block_order(trim, expected, ids, new):
    builder = labelled([4, 4])
    originals = {id(block) for stack in builder.rack for block in stack.blocks}
    assert builder.upscale(trim) == new
    assert order(builder) == expected
    assert builder.rack.stack_ids == ids  # originals keep their ids; copies get new ones
    assert builder.to_spec().blocks_per_stack == [len(s) for s in expected]
    copies = [block for position in new for block in builder.rack[position].blocks]
    assert not originals & {id(block) for block in copies}
    assert not {p.data_ptr() for b in copies for p in b.parameters()} & {
        p.data_ptr() for position, stack in enumerate(builder.rack) if position not in new for p in stack.parameters()}


def test_upscale_of_a_32_block_rack_by_8_gives_48_blocks():
    builder = labelled([4] * 8)
    builder.upscale(8)
    flat = [i for stack in order(builder) for i in stack]
    assert flat == list(range(24)) + list(range(8, 32)) and len(flat) == 48


def test_stack_repeats_the_whole_rack():
    builder = labelled([2, 3])
    assert builder.stack(3) == [2, 3, 4, 5]
    assert order(builder) == [[0, 1], [2, 3, 4]] * 3
    assert builder.rack.stack_ids == ["0", "1", "2", "3", "4", "5"]
    assert all(stack.role == "trainable" and stack.precision == "fp32" for stack in builder.rack)


def test_interleave_inserts_after_every_k_blocks():
    builder = labelled([2, 2, 2, 2])
    assert builder.interleave(4) == [2, 5]
    assert order(builder) == [[0, 1], [2, 3], [3], [4, 5], [6, 7], [7]]
    assert builder.rack.stack_ids == ["0", "1", "4", "2", "3", "5"]
    builder = labelled([2, 2, 2, 2])
    assert builder.interleave(2, blocks=2, init="copy") == [1, 3, 5, 7]
    assert order(builder) == [[0, 1], [0, 1], [2, 3], [2, 3], [4, 5], [4, 5], [6, 7], [6, 7]]
    builder = labelled([1] * 32)  # LLaMA Pro: 32 blocks, a new one after every 4 -> 40
    assert len(builder.interleave(4)) == 8 and sum(len(s) for s in builder.rack) == 40


@pytest.mark.parametrize("sizes", [[2, 2, 2, 2], [1, 3, 2, 2]])
def test_interleaved_identity_growth_leaves_the_logits_unchanged(sizes):
    builder = labelled(sizes)
    for stack in builder.rack:  # labelled norms would blow the activations up; plain ones here
        for block in stack.blocks:
            torch.nn.init.ones_(block.attn_norm.weight)
    builder.freeze([1], precision="nf4")  # the block before the first insertion point: NF4, copied densely
    ids = torch.randint(0, 64, (2, 16))
    before = logits(builder.model, ids)
    new = builder.interleave(4)
    assert (logits(builder.model, ids) - before).abs().max() < 1e-6
    assert [len(stack) for stack in builder.rack] == [*sizes[:2], 1, *sizes[2:], 1]
    for position in new:
        stack = builder.rack[position]
        assert not any(isinstance(m, LoRALinear) for m in stack.modules())
        assert all(p.dtype == torch.float32 and p.requires_grad for p in stack.parameters())
        assert all(torch.count_nonzero(proj.weight) == 0 for b in stack.blocks for proj in b.output_projections())
    # the copy is the block before, output projections aside
    below, copy = builder.rack[new[0] - 1].blocks[-1], builder.rack[new[0]].blocks[0]
    assert torch.equal(dequantize(below.attention.q.weight, torch.float32), copy.attention.q.weight)


# ---- errors name the field -----------------------------------------------------------------------


def plan_config(tmp_path, schedule, sizes=(2, 2)):
    return {
        "model": model_config(list(sizes), vocab_size=64),
        "training": {"batch_size": 4, "seq_len": 16, "total_steps": 10},
        "data": {"use_dummy_data": True},
        "schedule": schedule,
        "run": {"dir": str(tmp_path / "runs")},
    }


def test_an_insertion_point_inside_a_stack_is_a_config_error(tmp_path, capsys):
    schedule = [{"name": "one", "start_t": 0.0, "end_t": 0.5},
                {"name": "two", "start_t": 0.5, "end_t": 1.0,
                 "model_config": {"grow": {"where": "interleave", "every": 3, "init": "identity"}, "trainable": "new"}}]
    config = StackWiseConfig.from_dict(plan_config(tmp_path, schedule))
    builder = ProgressiveRackBuilder(config)
    with pytest.raises(ConfigError) as err:
        apply_model_phase(builder.model, config.schedule[1].model_config_, 1, config)
    assert err.value.paths == ["schedule.1.model_config.grow.every"]
    assert "[2, 2]" in str(err.value) and "blocks_per_stack divide every" in str(err.value)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(plan_config(tmp_path, schedule)))
    assert main(["plan", str(path)]) == 2
    assert "schedule.1.model_config.grow.every" in capsys.readouterr().err


def test_trim_must_leave_a_block():
    with pytest.raises(ConfigError) as err:
        labelled([2, 2]).upscale(4)
    assert err.value.paths == ["grow.trim"]


# ---- on the machine ------------------------------------------------------------------------------


def machine_config(tmp_path, corpus, grow, **plane):
    return {
        "model": model_config([1, 1]),
        "training": {"batch_size": 8, "seq_len": 32, "optimizer": {"lr": 3e-3}, "seed": 1},
        "data": {"paths": [str(corpus)]},
        "schedule": [{"name": "one", "start_t": 0.0, "end_t": 0.3},
                     {"name": "two", "start_t": 0.3, "end_t": 1.0, "model_config": {"grow": grow, **plane}}],
        "run": {"dir": str(tmp_path / "runs"), "eval_every": 1000, "eval_batches": 1, "log_every": 1000},
    }


INTERLEAVE = {"where": "interleave", "every": 1, "init": "identity"}


@pytest.mark.parametrize("trunk", ["frozen", "qlora"])
def test_interleaved_growth_trains_only_the_new_stacks(tmp_path, corpus, trunk):
    cfg = machine_config(tmp_path, corpus, INTERLEAVE, trainable="new", trunk=trunk, lora={"rank": 4})
    machine = TrainingMachine(cfg, total_steps=12, run_dir=False, console=False)
    for _ in range(4):
        machine.train_step()
    machine.planes  # noqa: B018 - enters phase "two", which grows
    spec = machine.model.rack.to_spec()
    assert spec.stack_ids == ["0", "2", "1", "3"] and spec.blocks_per_stack == [1, 1, 1, 1]
    assert spec.roles == (["frozen", "trainable"] * 2 if trunk == "frozen" else ["adapted", "trainable"] * 2)
    before = {n: dequantize(p).clone() for n, p in machine.model.named_parameters()}
    losses = [machine.train_step()["loss"].item() for _ in range(8)]
    assert all(torch.isfinite(torch.tensor(losses))) and min(losses[-3:]) < losses[0]
    changed = {n for n, p in machine.model.named_parameters() if not torch.equal(dequantize(p), before[n])}
    new_stacks = ("rack.stacks.2.", "rack.stacks.3.")
    assert any(n.startswith(new_stacks) for n in changed)
    if trunk == "frozen":
        assert all(n.startswith((*new_stacks, "head.")) for n in changed), changed
    else:  # the old stacks move through their adapters only; their NF4 bases stay
        assert all(n.startswith((*new_stacks, "head.")) or "lora_" in n for n in changed), changed
        assert any("lora_" in n for n in changed)


def test_a_run_with_upscale_resumes_exactly(tmp_path, corpus):
    cfg = machine_config(tmp_path, corpus, {"init": "upscale", "trim": 1}, trainable="all")
    cfg["model"]["architecture"] = {"n_stacks": 2, "blocks_per_stack": 2}
    cfg["training"]["total_steps"] = 10
    full = TrainingMachine(cfg, console=False)
    reference = full.train()
    assert full.model.rack.to_spec().blocks_per_stack == [2, 1, 1, 2]
    cfg["run"]["dir"] = str(tmp_path / "other")
    first = TrainingMachine(cfg, console=False)
    for _ in range(6):  # inside phase "two": the up-scaled rack and its optimizer state are saved
        first.train_step()
    first.save_checkpoint()
    first.log.close()
    resumed = TrainingMachine(cfg, resume=first.run_dir, console=False)
    assert resumed.step == 6 and resumed.model.rack.to_spec().blocks_per_stack == [2, 1, 1, 2]  # replayed
    assert resumed.train().losses == reference.losses
    assert resumed.model.rack.stack_ids == full.model.rack.stack_ids == ["0", "1", "2", "3"]


# ---- optimizer state of grown copies -----------------------------------------------------------------


def _state_by_name(machine):
    names = [n for g in machine.optim.optimizer.param_groups for n in g["names"]]
    params = [p for g in machine.optim.optimizer.param_groups for p in g["params"]]
    return {n: machine.optim.optimizer.state.get(p, {}) for n, p in zip(names, params, strict=True)}


@pytest.mark.parametrize("optimizer_state", ["fresh", "copy"])
def test_stacked_copies_start_fresh_or_with_the_state_of_what_they_copy(tmp_path, corpus, optimizer_state):
    grow = {"init": "stack", "factor": 2, "optimizer_state": optimizer_state}
    machine = TrainingMachine(machine_config(tmp_path, corpus, grow, trainable="all"), total_steps=12, run_dir=False,
                              console=False)
    for _ in range(4):
        machine.train_step()
    before = {n: {k: v.clone() for k, v in st.items()} for n, st in _state_by_name(machine).items()}
    machine.planes  # noqa: B018 - enters phase "two": [s0, s1] -> [s0, s1, s0', s1']
    assert machine.model.rack.stack_ids == ["0", "1", "2", "3"]
    after = _state_by_name(machine)
    copies = {f"rack.stacks.{new}.{rest}": f"rack.stacks.{old}.{rest}"
              for new, old in (("2", "0"), ("3", "1")) for rest in
              (n.split(".", 3)[3] for n in before if n.startswith(f"rack.stacks.{old}."))}
    assert len(copies) == len([n for n in before if n.startswith("rack.stacks.")]) > 0
    for name, source in copies.items():
        if optimizer_state == "fresh":
            assert after[name] == {}, name
            continue
        assert set(after[name]) == set(before[source]) == {"step", "exp_avg", "exp_avg_sq"}
        for key, value in before[source].items():
            assert torch.equal(after[name][key], value), (name, key)
            assert after[name][key].data_ptr() != after[source][key].data_ptr()  # its own tensors
    for name, state in before.items():  # the originals keep theirs either way
        assert all(torch.equal(after[name][k], v) for k, v in state.items())
    losses = [machine.train_step()["loss"].item() for _ in range(4)]
    assert all(torch.isfinite(torch.tensor(losses)))


@pytest.mark.parametrize(("sizes", "grow", "plane"), [
    ([1], {"init": "copy"}, {"trainable": "new", "trunk": "qlora", "lora": {"rank": 4}}),  # source quantized next
    ([1], {"init": "copy"}, {"trainable": "new", "trunk_precision": "nf4"}),
    ([1], {"init": "copy", "n": 2}, {"trainable": "all"}),  # the second copy copies the first
    ([2, 2], {"init": "upscale", "trim": 1}, {"trainable": "all"}),  # sources trimmed away after copying
    ([1, 1], {"where": "interleave", "every": 1, "init": "identity"}, {"trainable": "new"}),
], ids=["qlora-trunk", "nf4-trunk", "n2", "upscale", "interleave"])
def test_every_copied_parameter_starts_with_the_state_of_its_source(tmp_path, corpus, sizes, grow, plane):
    cfg = machine_config(tmp_path, corpus, {**grow, "optimizer_state": "copy"}, **plane)
    cfg["model"] = model_config(sizes)
    machine = TrainingMachine(cfg, total_steps=12, run_dir=False, console=False)
    for _ in range(4):  # phase "one": everything trains
        machine.train_step()
    before = {n: {k: v.clone() for k, v in st.items()} for n, st in _state_by_name(machine).items()}
    machine.planes  # noqa: B018 - enters phase "two"
    after, sources = _state_by_name(machine), machine.model_plane.state_sources
    new = sorted(n for n in machine.model_plane.new_parameters if n in after)
    assert new and sorted(sources) == new  # every trainable parameter of the copies has a source
    for name in new:
        assert after[name]["step"].item() == 4, name  # carried from phase one's 4 steps, not fresh
        assert torch.equal(after[name]["exp_avg_sq"], before[sources[name]]["exp_avg_sq"]), name


def test_the_builder_refuses_optimizer_state():
    with pytest.raises(ConfigError) as err:
        labelled([1]).grow(init="copy", optimizer_state="copy")
    assert err.value.paths == ["grow.optimizer_state"]


def test_a_run_that_copies_optimizer_state_resumes_exactly_across_the_growth(tmp_path, corpus):
    cfg = machine_config(tmp_path, corpus, {"init": "stack", "factor": 2, "optimizer_state": "copy"}, trainable="all")
    cfg["training"]["total_steps"] = 10
    reference = TrainingMachine(cfg, console=False).train()
    cfg["run"]["dir"] = str(tmp_path / "other")
    first = TrainingMachine(cfg, console=False)
    for _ in range(2):  # in phase "one": the copies' state is made again after the resume
        first.train_step()
    first.save_checkpoint()
    first.log.close()
    resumed = TrainingMachine(cfg, resume=first.run_dir, console=False)
    assert resumed.step == 2
    assert resumed.train().losses == reference.losses


@pytest.mark.parametrize("grow", [{"init": "identity"}, {"init": "random", "where": "prepend"},
                                  {"where": "interleave", "every": 1, "init": "random"}])
def test_copying_optimizer_state_needs_an_operator_that_copies_blocks(grow):
    with pytest.raises(ConfigError) as err:
        StackWiseConfig.from_dict({"model": model_config([1], vocab_size=64), "training": {"seq_len": 32}, "data": {},
                                   "schedule": [{"name": "one", "start_t": 0.0, "end_t": 0.5},
                                                {"name": "two", "start_t": 0.5, "end_t": 1.0,
                                                 "model_config": {"grow": {**grow, "optimizer_state": "copy"}}}]})
    assert err.value.paths == ["schedule.1.model_config.grow.optimizer_state"]
    assert "copied blocks" in str(err.value)


@pytest.mark.parametrize("embedding", ["frozen", "auto", "trainable"])
def test_a_tied_head_trains_unless_the_embedding_is_frozen_and_then_it_is_said(tmp_path, corpus, capsys, embedding):
    cfg = machine_config(tmp_path, corpus, {"init": "identity"}, trainable="new", embedding=embedding)
    cfg["model"]["tie_embeddings"] = True
    machine = TrainingMachine(cfg, total_steps=12, run_dir=False, console=True)
    for _ in range(5):  # into phase "two": a frozen trunk under the new stack
        machine.train_step()
    said = capsys.readouterr().err
    assert machine.model.tied and machine.model.rack.to_spec().roles == ["frozen", "frozen", "trainable"]
    if embedding == "frozen":
        assert not machine.model.head.proj.weight.requires_grad
        assert "phase two: the head is tied to the embedding, which is frozen, so the head does not train" in said
    else:
        assert machine.model.head.proj.weight.requires_grad and "head is tied" not in said


def test_a_run_made_when_auto_froze_a_tied_embedding_is_refused_by_name_not_skipped(tmp_path, corpus):
    cfg = machine_config(tmp_path, corpus, {"init": "identity"}, trainable="new", embedding="frozen")
    cfg["model"]["tie_embeddings"] = True
    cfg["training"]["total_steps"] = 12
    first = TrainingMachine(cfg, console=False)
    for _ in range(8):  # into phase "two", where the old `auto` froze the tied embedding
        first.train_step()
    first.save_checkpoint()
    first.log.close()
    # the run as an earlier version recorded it: `embedding: auto`, with that behaviour
    recorded = first.run_dir / "config.yaml"
    recorded.write_text(recorded.read_text().replace("embedding: frozen", "embedding: auto"))
    cfg["schedule"][1]["model_config"]["embedding"] = "auto"
    with pytest.raises(ConfigError) as err:
        TrainingMachine(cfg, resume=first.run_dir, console=False)
    assert err.value.paths == ["schedule.1.model_config.embedding"]
    assert "model.init_from" in str(err.value)


# ---- plan ------------------------------------------------------------------------------------------


def test_plan_shows_the_structure_each_operator_gives(tmp_path, capsys):
    schedule = [
        {"name": "base", "start_t": 0.0, "end_t": 0.25},
        {"name": "pro", "start_t": 0.25, "end_t": 0.5, "model_config": {"grow": INTERLEAVE | {"every": 2}, "trainable": "new"}},
        {"name": "solar", "start_t": 0.5, "end_t": 0.75, "model_config": {"grow": {"init": "upscale", "trim": 1}, "trainable": "new"}},
        {"name": "gstack", "start_t": 0.75, "end_t": 1.0, "model_config": {"grow": {"init": "stack", "factor": 2}, "trainable": "new"}},
    ]
    data = plan_config(tmp_path, schedule)
    config = StackWiseConfig.from_dict(data)
    per_block = block_param_count(config.model)
    outside = 2 * 64 * 32 + 32  # embedding, head projection, final norm (untied)
    head = 64 * 32 + 32
    # 4 blocks in [2, 2]; interleave every 2 -> [2, 1, 2, 1]; upscale trim 1 of 6 -> [2, 1, 2] + [1, 1, 2, 1];
    # stack x2 -> 14 stacks, 20 blocks
    stacks, blocks, new_blocks = [2, 4, 7, 14], [4, 6, 10, 20], [4, 2, 5, 10]
    rows = plan_rows(config, 10)
    assert [r["stacks"] for r in rows] == stacks and [r["blocks"] for r in rows] == blocks
    assert [r["params"] for r in rows] == [outside + b * per_block for b in blocks]
    assert [r["trainable"] for r in rows] == [outside + 4 * per_block] + [head + b * per_block for b in new_blocks[1:]]
    path = tmp_path / "ops.yaml"
    path.write_text(yaml.safe_dump(data))
    assert main(["plan", str(path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    header = lines[0].split()
    table = {line.split()[0]: dict(zip(header[:8], line.split()[:8], strict=True)) for line in lines[2:]}
    assert [table[p]["stacks"] for p in ("base", "pro", "solar", "gstack")] == [str(s) for s in stacks]
    assert [table[p]["blocks"] for p in ("base", "pro", "solar", "gstack")] == [str(b) for b in blocks]


def test_plan_replays_the_operators_over_a_qlora_trunk(tmp_path):
    schedule = [
        {"name": "base", "start_t": 0.0, "end_t": 0.5, "model_config": {"trainable": "new", "trunk": "qlora",
                                                                          "grow": {"init": "upscale", "trim": 1}}},
        {"name": "more", "start_t": 0.5, "end_t": 1.0, "model_config": {"trainable": "new", "trunk": "qlora",
                                                                          "grow": INTERLEAVE | {"every": 2}}},
    ]
    # [2, 2] -> [2, 1] + [1, 2]; a new stack after blocks 2, 4 and 6 (copies of NF4 blocks)
    rows = plan_rows(StackWiseConfig.from_dict(plan_config(tmp_path, schedule)), 10)
    assert [(r["stacks"], r["blocks"]) for r in rows] == [(4, 6), (7, 9)]
