"""Progressive growth: stable names, identity growth, frozen and QLoRA trunks, the activation
cache (exactness, spill, invalidation), exact resume with NF4, and the builder / trainer."""

import math

import pytest
import torch

from stackwise.config import StackWiseConfig
from stackwise.model import StackWiseModel
from stackwise.model.lora import LoRALinear, storage_bytes
from stackwise.model.quant import dequantize, is_nf4
from stackwise.training import (
    ProgressiveDataLoader,
    ProgressiveRackBuilder,
    ProgressiveTrainer,
    TrainingMachine,
)
from tests.runs import write_small_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_small_corpus(tmp_path_factory.mktemp("corpus"))


def config(tmp_path, corpus, schedule, **extra):
    cfg = {
        "model": {"d_model": 32, "n_heads": 2, "max_seq_len": 32, "tie_embeddings": False,
                  "architecture": {"n_stacks": 1, "blocks_per_stack": 1}},
        "training": {"batch_size": 8, "seq_len": 32, "optimizer": {"lr": 3e-3}, "seed": 1},
        "data": {"paths": [str(corpus)]},
        "schedule": schedule,
        "run": {"dir": str(tmp_path / "runs"), "eval_every": 1000, "eval_batches": 1, "log_every": 1000},
    }
    for key, value in extra.items():
        section, _, field = key.partition("__")
        cfg[section][field] = value
    return cfg


def grow(where="append", init="identity", **model):
    return {"grow": {"n": 1, "where": where, "init": init}, "trainable": "new", **model}


def two_phases(**model):
    return [{"name": "one", "start_t": 0.0, "end_t": 0.3}, {"name": "two", "start_t": 0.3, "end_t": 1.0, "model_config": grow(**model)}]


# ---- growth ----------------------------------------------------------------------------------


@pytest.mark.parametrize("where", ["append", "prepend"])
def test_growth_keeps_names_and_optimizer_state(tmp_path, corpus, where):
    machine = TrainingMachine(config(tmp_path, corpus, two_phases(where=where, trunk="trainable")),
                              total_steps=10, run_dir=False, console=False)
    for _ in range(3):
        machine.train_step()
    before = dict(machine.model.named_parameters())
    param = before["rack.stacks.0.blocks.0.mlp.up.weight"]
    moments = machine.optim.optimizer.state[param]["exp_avg"].clone()
    machine.train_step()  # grows
    after = dict(machine.model.named_parameters())
    for name, p in before.items():
        assert after[name] is p, name  # same names, same tensors
    assert machine.model.rack.stack_ids == (["0", "1"] if where == "append" else ["1", "0"])
    state = machine.optim.optimizer.state[param]
    assert state["step"].item() == 4  # carried over and stepped once more, not restarted
    assert not torch.equal(state["exp_avg"], moments)


@pytest.mark.parametrize("where", ["append", "prepend"])
def test_identity_growth_leaves_logits_unchanged(tmp_path, corpus, where):
    machine = TrainingMachine(config(tmp_path, corpus, two_phases(where=where)), total_steps=10, run_dir=False, console=False)
    for _ in range(3):
        machine.train_step()
    ids = torch.randint(0, 259, (2, 32))
    machine.model.eval()
    with torch.no_grad():
        before = machine.model(ids)
    machine.planes  # noqa: B018 - enters phase "two", which grows
    assert len(machine.model.rack) == 2
    machine.model.eval()
    with torch.no_grad():
        after = machine.model(ids)
    assert (after - before).abs().max() < 1e-6


def test_copy_growth_duplicates_the_neighbour(tmp_path, corpus):
    machine = TrainingMachine(config(tmp_path, corpus, two_phases(init="copy")), total_steps=10, run_dir=False, console=False)
    machine.planes  # noqa: B018
    for _ in range(3):
        machine.train_step()
    old = {k: v.clone() for k, v in machine.model.rack[0].state_dict().items()}
    machine.planes  # noqa: B018 - enters phase "two", which grows by copying
    new = machine.model.rack[1].state_dict()
    assert all(torch.equal(old[k], new[k]) for k in old)
    assert new[next(iter(new))].data_ptr() != machine.model.rack[0].state_dict()[next(iter(new))].data_ptr()


def test_frozen_trunk_does_not_change_and_gets_no_gradient(tmp_path, corpus):
    machine = TrainingMachine(config(tmp_path, corpus, two_phases()), total_steps=10, run_dir=False, console=False)
    for _ in range(4):
        machine.train_step()
    trunk = {n: p.clone() for n, p in machine.model.rack[0].named_parameters()}
    embedding = machine.model.embedding.tokens.weight.clone()
    while machine.step < 10:
        machine.train_step()
    for n, p in machine.model.rack[0].named_parameters():
        assert torch.equal(p, trunk[n]) and p.grad is None and not p.requires_grad
    assert torch.equal(machine.model.embedding.tokens.weight, embedding)
    assert machine.model.rack.to_spec().roles == ["frozen", "trainable"]


# ---- QLoRA trunk -------------------------------------------------------------------------------


def test_qlora_trunk_trains_only_adapters_and_the_new_stack(tmp_path, corpus):
    machine = TrainingMachine(config(tmp_path, corpus, two_phases(trunk="qlora", lora={"rank": 4})),
                              total_steps=10, run_dir=False, console=False)
    for _ in range(4):
        machine.train_step()
    trunk = machine.model.rack[0]
    assert machine.model.rack.to_spec().roles == ["adapted", "trainable"]
    assert machine.model.rack.to_spec().precisions == ["nf4", "fp32"]
    before = {n: p.detach().clone() for n, p in machine.model.named_parameters() if p.requires_grad}
    frozen_base = {n: m.weight for n, m in trunk.named_modules() if isinstance(m, LoRALinear)}
    assert frozen_base and all(is_nf4(w) for w in frozen_base.values())
    snapshot = {n: dequantize(w) for n, w in frozen_base.items()}
    while machine.step < 10:
        machine.train_step()
    changed = {n for n, p in machine.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])}
    assert changed, "nothing trained"
    assert all("lora_" in n or n.startswith(("rack.stacks.1.", "head.")) for n in changed), changed
    assert any("lora_" in n for n in changed)
    for n, w in frozen_base.items():
        assert torch.equal(dequantize(w), snapshot[n])  # NF4 base untouched


def test_nf4_trunk_storage_is_under_30_percent_of_fp32():
    cfg = StackWiseConfig.from_dict({"model": {"d_model": 256, "n_heads": 8, "vocab_size": 300,
                                               "architecture": {"n_stacks": 2, "blocks_per_stack": 1}},
                                     "training": {}, "data": {}})
    builder = ProgressiveRackBuilder(cfg)
    fp32 = storage_bytes(builder.rack[0])
    builder.freeze([0])
    builder.quantize_trunk()
    assert builder.to_spec().precisions == ["nf4", "fp32"]
    assert storage_bytes(builder.rack[0]) <= 0.30 * fp32
    builder.attach_lora([1], rank=8)
    assert builder.to_spec().roles == ["frozen", "adapted"]
    assert storage_bytes(builder.rack[1]) <= 0.30 * fp32


def test_resume_with_a_qlora_trunk_is_exact(tmp_path, corpus):
    schedule = two_phases(trunk="qlora", lora={"rank": 4})
    full = TrainingMachine(config(tmp_path / "a", corpus, schedule), total_steps=10, console=False)
    reference = full.train()
    first = TrainingMachine(config(tmp_path / "b", corpus, schedule), total_steps=10, console=False)
    for _ in range(6):  # inside phase "two": the NF4 trunk and its adapters are in the checkpoint
        first.train_step()
    first.save_checkpoint()
    first.log.close()
    resumed = TrainingMachine(config(tmp_path / "b", corpus, schedule), total_steps=10, resume=first.run_dir, console=False)
    assert resumed.train().losses == reference.losses
    for (name, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        assert is_nf4(a) == is_nf4(b), name
        assert torch.equal(dequantize(a) if is_nf4(a) else a, dequantize(b) if is_nf4(b) else b), name


# ---- activation cache ------------------------------------------------------------------------


def run_losses(tmp_path, corpus, schedule, steps=60, **run):
    """Per-step losses, and the cache's hit count just before the run ends."""
    cfg = config(tmp_path, corpus, schedule)
    cfg["run"].update(run)
    machine = TrainingMachine(cfg, total_steps=steps, run_dir=False, console=False)
    while machine.step < steps - 1:
        machine.train_step()
    hits = machine.cache.cache.stats.hits if machine.cache.active else 0
    return machine.train().losses, hits


@pytest.mark.parametrize("objective", ["clm", "diffusion"])
def test_cached_and_uncached_runs_have_identical_losses(tmp_path, corpus, objective):
    schedule = two_phases()
    for phase in schedule:
        phase["task"] = objective
    cached, hits = run_losses(tmp_path, corpus, schedule, activation_cache=True)
    uncached, no_hits = run_losses(tmp_path, corpus, schedule, activation_cache=False)
    assert hits > 0 and no_hits == 0  # the cached run really read the cache
    assert cached == uncached


def test_cache_is_used_and_spills_to_disk(tmp_path, corpus):
    cfg = config(tmp_path, corpus, two_phases())
    cfg["run"]["cache_ram_mb"] = 0  # every row goes to the file
    machine = TrainingMachine(cfg, total_steps=80, console=False)
    for _ in range(80):
        machine.train_step()
    cache = machine.cache.cache
    assert cache.ram_rows == 0 and cache.file_rows == machine.data.loader.n_train_windows
    assert (machine.run_dir / "cache" / "activations.f32").exists()
    assert cache.stats.hits > cache.stats.misses > 0  # epochs wrapped: later ones read the cache
    machine.train()
    assert not (machine.run_dir / "cache" / "activations.f32").exists()


def test_cache_is_invalidated_when_the_trunk_changes(tmp_path, corpus):
    schedule = [*two_phases()[:1], {"name": "two", "start_t": 0.3, "end_t": 0.6, "model_config": grow()},
                {"name": "three", "start_t": 0.6, "end_t": 1.0, "model_config": grow()}]
    # Phases of 72 and 96 draws of 130 windows: under an epoch, so the cache is forced on.
    cfg = config(tmp_path, corpus, schedule, run__activation_cache=True)
    machine = TrainingMachine(cfg, total_steps=30, run_dir=False, console=False)
    contexts = []
    while machine.step < 30:
        machine.train_step()
        if machine.cache.active and machine.cache.context not in contexts:
            contexts.append(machine.cache.context)
            assert int(machine.cache.cache.filled.sum()) <= machine.config.training.batch_size  # starts empty
    assert len(contexts) == 2 and contexts[0][0] != contexts[1][0]  # a new trunk version each growth


def test_cache_off_reasons_are_logged(tmp_path, corpus):
    prepend = [{"name": "one", "start_t": 0.0, "end_t": 0.5},
               {"name": "two", "start_t": 0.5, "end_t": 1.0, "model_config": grow(where="prepend")}]
    machine = TrainingMachine(config(tmp_path, corpus, prepend), total_steps=4, console=False)
    machine.train()
    events = [e for e in __import__("stackwise.training.logger", fromlist=["read_metrics"]).read_metrics(machine.run_dir)
              if e["kind"] == "cache"]
    assert len(events) == 2 and all("off" in e["message"] for e in events)
    assert "bottom stack trains" in events[1]["message"]


# ---- builder and trainer ---------------------------------------------------------------------


def test_train_rack_grows_to_k_stacks_on_the_machine(tmp_path, corpus):
    cfg = StackWiseConfig.from_dict(config(tmp_path, corpus, None))
    loader = ProgressiveDataLoader(cfg)
    builder = ProgressiveRackBuilder(cfg, vocab_size=loader.vocab_size)
    result = ProgressiveTrainer(cfg).train_rack(builder, loader, target_stacks=3, total_steps=12, console=False)
    assert len(builder.rack) == 3
    assert [t.to_phase for t in result.transitions] == ["stacks2", "stacks3"]
    assert builder.to_spec().roles == ["frozen", "frozen", "trainable"]
    assert result.steps == 12


@pytest.mark.parametrize("over", [None, "phase"])
def test_the_progressive_shorthand_runs_its_lr_shape_over_the_whole_run(tmp_path, corpus, over):
    cfg = config(tmp_path, corpus, None)
    cfg["training"]["optimizer"]["lr"] = {"schedule": "cosine", "peak": 2e-3, "final": 2e-4, "warmup": 0.1,
                                          **({"over": over} if over else {})}
    cfg["training"]["progressive"] = {"target_stacks": 3}
    machine = TrainingMachine(cfg, total_steps=20, run_dir=False, console=False)
    lrs = [machine.train_step()["lr"] for _ in range(20)]
    assert [p.name for p in machine.schedule.phases] == ["stacks1", "stacks2", "stacks3"]
    if over is None:  # one cosine over the run, by the formula, across both transitions
        def expected(step):
            t = step / 20
            if t < 0.1:
                return 2e-3 * t / 0.1
            return 2e-4 + 0.5 * (2e-3 - 2e-4) * (1 + math.cos(math.pi * (t - 0.1) / 0.9))
        assert lrs == pytest.approx([expected(s) for s in range(20)], rel=1e-9, abs=1e-12)
    else:  # said explicitly: each phase warms up again
        restarts = [i for i in range(1, 20) if lrs[i] < 0.5 * lrs[i - 1]]
        assert lrs[0] == 0.0 and len(restarts) == 2  # a new warmup at each transition


def test_builder_operations_report_in_the_spec():
    cfg = StackWiseConfig.from_dict({"model": {"d_model": 64, "n_heads": 4, "vocab_size": 300,
                                               "architecture": {"n_stacks": 1, "blocks_per_stack": 1}},
                                     "training": {}, "data": {}})
    builder = ProgressiveRackBuilder(cfg)
    assert builder.add_stack() == 1 and builder.add_stack(where="prepend") == 0
    builder.freeze([1])
    builder.attach_lora([0], rank=4)
    spec = builder.to_spec()
    assert spec.n_stacks == 3 and spec.roles == ["adapted", "frozen", "trainable"]
    assert spec.precisions == ["nf4", "fp32", "fp32"]
    builder.unfreeze([0])
    assert builder.to_spec().roles[0] == "trainable"
    assert not any(isinstance(m, LoRALinear) for m in builder.rack[0].modules())
    assert isinstance(builder.model, StackWiseModel)


# ---- per-stack precision -----------------------------------------------------------------------


def test_stack_and_trunk_precision(tmp_path, corpus):
    schedule = two_phases(trunk_precision="bf16", stack_precision={1: "bf16"})
    machine = TrainingMachine(config(tmp_path, corpus, schedule), total_steps=6, run_dir=False, console=False)
    fp32_bytes = 4 * sum(p.numel() for p in machine.model.rack[0].parameters())
    while machine.step < 6:
        out = machine.train_step()
        assert torch.isfinite(out["loss"])
    spec = machine.model.rack.to_spec()
    assert spec.precisions == ["bf16", "bf16"] and spec.roles == ["frozen", "trainable"]
    assert storage_bytes(machine.model.rack[0]) == fp32_bytes // 2
    assert all(p.dtype == torch.bfloat16 for p in machine.model.rack[1].parameters())
    assert machine.model.rack[1].blocks[0].mlp.up.weight.grad is None  # zeroed after the step


def test_a_resumed_run_keeps_its_activation_cache(tmp_path, corpus):
    # Phase "two" runs steps 12-39: 224 draws of 130 windows, and 208 from step 14, so samples repeat.
    first = TrainingMachine(config(tmp_path, corpus, two_phases()), total_steps=40, console=False)
    for _ in range(14):  # inside phase "two", cache on
        first.train_step()
    assert first.cache.active
    first.save_checkpoint()
    first.log.close()
    resumed = TrainingMachine(config(tmp_path, corpus, two_phases()), total_steps=40, resume=first.run_dir, console=False)
    assert resumed.phase.name == "two" and resumed.cache.active
    resumed.train()
