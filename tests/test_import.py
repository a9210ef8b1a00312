"""`model.init_from`: Hugging Face Llama / Mistral / Qwen2 folders, run directories and checkpoint
folders become the starting weights of a new run; extending a finished run with --steps/--extend."""

import json

import pytest
import torch
import yaml

from stackwise.cli import main
from stackwise.config import ConfigError, StackWiseConfig
from stackwise.training import TrainingMachine
from stackwise.training.optimizer import optimizer_param_names
from tests.hf_models import hf_model, text_ids

pytest.importorskip("transformers", reason="the interop tests build tiny models with transformers (dev lock)")


def config(tmp_path, init_from, steps=4, **model):
    return StackWiseConfig.from_dict({
        "model": {"init_from": str(init_from), **model},
        "training": {"batch_size": 4, "seq_len": 32, "total_steps": steps, "optimizer": {"lr": 1e-3}},
        "data": {},
        "run": {"dir": str(tmp_path / "runs"), "eval_batches": 1, "log_every": 1},
    })


def imported(tmp_path, family="llama", **hf_extra):
    hf = hf_model(tmp_path / family, family=family, **hf_extra)
    machine = TrainingMachine(config(tmp_path, tmp_path / family, architecture={"blocks_per_stack": 2}),
                              run_dir=tmp_path / f"run-{family}", console=False)
    return hf, machine


def max_logit_gap(ours, hf, ids):
    with torch.no_grad():
        theirs = hf(ids).logits
        mine = ours(ids)[..., : theirs.shape[-1]]
    return float((mine - theirs).abs().max())


@pytest.mark.parametrize("family, extra", [
    ("llama", {}),
    ("llama", {"tied": True, "num_key_value_heads": 4}),
    ("mistral", {"sliding_window": None}),
    ("qwen2", {}),
])
def test_imported_logits_equal_transformers(tmp_path, family, extra):
    hf, machine = imported(tmp_path, family, **extra)
    cfg = machine.config.model
    assert (cfg.d_model, cfg.n_heads, cfg.ffn_hidden, cfg.rope_theta, cfg.norm_eps) == (64, 4, 160, 5000.0, 1e-6)
    assert cfg.architecture.stack_sizes == [2, 2] and cfg.qkv_bias == (family == "qwen2")
    assert cfg.tie_embeddings == extra.get("tied", False) and machine.model.tied == cfg.tie_embeddings
    ids = text_ids(machine.data.tokenizer)
    assert max_logit_gap(machine.model, hf, ids) < 1e-5


def test_tokenizer_gains_specials_and_the_vocabulary_follows(tmp_path):
    hf, machine = imported(tmp_path)
    tok = machine.data.tokenizer
    assert tok.hf.id_to_token(tok.eos_id) == "<|endoftext|>" and tok.added == ["[PAD]", "[MASK]"]
    rows = machine.model.embedding.tokens.weight
    assert rows.shape[0] == hf.config.vocab_size + 2 == machine.config.model.vocab_size
    # The new rows start as the mean row; the imported ones are untouched.
    assert torch.allclose(rows[-1], hf.model.embed_tokens.weight.mean(0), atol=1e-6)
    assert torch.equal(rows[: hf.config.vocab_size], hf.model.embed_tokens.weight)


def test_one_stack_of_all_layers_by_default_and_sharded_weights(tmp_path):
    hf = hf_model(tmp_path / "sharded", max_shard_size="60KB")
    assert (tmp_path / "sharded" / "model.safetensors.index.json").is_file()
    machine = TrainingMachine(config(tmp_path, tmp_path / "sharded"), run_dir=tmp_path / "run", console=False)
    assert machine.config.model.architecture.stack_sizes == [4]
    assert max_logit_gap(machine.model, hf, text_ids(machine.data.tokenizer)) < 1e-5


def test_imported_model_trains_and_its_run_resumes_without_the_source(tmp_path):
    import shutil

    hf_model(tmp_path / "llama")
    cfg = config(tmp_path, tmp_path / "llama", steps=6)
    machine = TrainingMachine(cfg, console=False)
    losses = [float(machine.train_step()["loss"]) for _ in range(6)]
    assert losses[-1] < losses[0]
    machine.save_checkpoint()
    machine.log.close()
    shutil.rmtree(tmp_path / "llama")  # a resumed or evaluated run needs only its own folder
    assert main(["eval", str(machine.run_dir), "--batches", "1"]) == 0
    saved = yaml.safe_load((machine.run_dir / "config.yaml").read_text())
    assert saved["model"]["d_model"] == 64 and saved["model"]["init_from"].endswith("llama")


def test_mistral_sliding_window(tmp_path):
    hf_model(tmp_path / "mistral", family="mistral", sliding_window=128)
    # Left unset, max_seq_len stops at the window: attention is then the model's own.
    assert TrainingMachine(config(tmp_path, tmp_path / "mistral"), run_dir=False).config.model.max_seq_len == 128
    with pytest.raises(ConfigError, match=r"model\.max_seq_len.*sliding window of 128"):
        TrainingMachine(config(tmp_path, tmp_path / "mistral", max_seq_len=256), run_dir=False)


def test_conflicts_and_unsupported_models_are_listed_clearly(tmp_path, capsys):
    hf_model(tmp_path / "llama")
    with pytest.raises(ConfigError) as err:
        TrainingMachine(config(tmp_path, tmp_path / "llama", d_model=128, n_heads=8, init_from_optimizer=True),
                        run_dir=False)
    assert {"model.d_model", "model.n_heads", "model.init_from_optimizer"} <= set(err.value.paths)
    cfg = json.loads((tmp_path / "llama" / "config.json").read_text())
    for change, words in [({"model_type": "gpt2"}, "not a Llama-family"), ({"hidden_act": "gelu"}, "hidden_act"),
                          ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5}}, "RoPE scaling")]:
        (tmp_path / "llama" / "config.json").write_text(json.dumps({**cfg, **change}))
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(config(tmp_path, tmp_path / "llama").to_dict()))
        assert main(["train", str(path)]) == 2
        message = capsys.readouterr().err
        assert "model.init_from" in message and words in message and "Traceback" not in message
    assert not (tmp_path / "runs").exists()  # refused before any run directory was made
    with pytest.raises(ConfigError, match="neither a Hugging Face model folder"):
        TrainingMachine(config(tmp_path, tmp_path), run_dir=False)


# ---- from a stackwise run -----------------------------------------------------------------


def source_run(tmp_path):
    """A finished two-phase run: a stack prepended in phase two on a QLoRA trunk (so ids are out
    of rack order and the trunk is NF4 + adapters)."""
    cfg = StackWiseConfig.from_dict({
        "model": {"d_model": 32, "n_heads": 2, "max_seq_len": 64, "architecture": {"n_stacks": 1, "blocks_per_stack": 2}},
        "training": {"batch_size": 4, "seq_len": 32, "total_steps": 6, "optimizer": {"lr": 3e-3}},
        "data": {},
        "schedule": [
            {"name": "one", "start_t": 0.0, "end_t": 0.5},
            {"name": "two", "start_t": 0.5, "end_t": 1.0, "model_config": {
                "grow": {"where": "prepend", "init": "identity"}, "trainable": "new", "trunk": "qlora",
                "lora": {"rank": 2, "targets": ["q", "v"]}}},
        ],
        "run": {"dir": str(tmp_path / "runs"), "name": "source", "eval_batches": 1},
    })
    machine = TrainingMachine(cfg, console=False)
    machine.train()
    return machine


def test_init_from_a_run_starts_from_exactly_its_weights(tmp_path):
    source = source_run(tmp_path)
    ids = text_ids(source.data.tokenizer, n=32)
    with torch.no_grad():
        expected = source.model(ids)
    new = TrainingMachine(config(tmp_path, source.run_dir, steps=2), run_dir=tmp_path / "new", console=False)
    assert new.config.model.architecture.stack_sizes == [2, 2] and new.config.model.d_model == 32
    assert all(stack.role == "trainable" and stack.precision == "fp32" for stack in new.model.rack)  # dense now
    with torch.no_grad():
        assert float((new.model(ids) - expected).abs().max()) < 1e-5  # NF4 dequantized exactly, LoRA merged
    # A checkpoint folder: that step's weights (the end of phase one, one stack).
    first = sorted((source.run_dir / "checkpoints").iterdir())[0]
    early = TrainingMachine(config(tmp_path, first, steps=2), run_dir=tmp_path / "early", console=False)
    assert early.config.model.architecture.stack_sizes == [2]


def test_init_from_optimizer_brings_matching_state(tmp_path):
    source = source_run(tmp_path)
    new = TrainingMachine(config(tmp_path, source.run_dir, steps=2, init_from_optimizer=True),
                          run_dir=tmp_path / "new", console=False)
    new.train_step()  # enters the first phase: the optimizer is built and receives the state
    # The trained stack (now rack position 0) brings its moments: exp_avg was carried, then stepped once.
    opt = new.optim.optimizer
    names = dict(zip(optimizer_param_names(opt),
                     (p for g in opt.param_groups for p in g["params"]), strict=True))
    first_id = new.model.rack.stack_ids[0]
    param = names[f"rack.stacks.{first_id}.blocks.0.attention.q.weight"]
    assert float(opt.state[param]["step"]) > 1  # counted on from the source's steps


# ---- extending a run -----------------------------------------------------------------------


def plain(tmp_path, name, steps):
    return {
        "model": {"d_model": 32, "n_heads": 2, "max_seq_len": 64, "architecture": {"n_stacks": 1, "blocks_per_stack": 1}},
        "training": {"batch_size": 4, "seq_len": 32, "total_steps": steps, "optimizer": {"lr": 2e-3}},
        "data": {},
        "run": {"dir": str(tmp_path), "name": name, "eval_every": 100, "eval_batches": 1, "log_every": 1},
    }


def losses(run_dir):
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["kind"] == "step"}


def test_resume_steps_extends_a_finished_run_exactly(tmp_path):
    short, long = tmp_path / "short.yaml", tmp_path / "long.yaml"
    short.write_text(yaml.safe_dump(plain(tmp_path, "short", 6)))
    long.write_text(yaml.safe_dump(plain(tmp_path, "long", 12)))
    assert main(["train", str(short)]) == 0 and main(["train", str(long)]) == 0
    assert main(["train", "--resume", str(tmp_path / "short"), "--steps", "12"]) == 0
    assert losses(tmp_path / "short") == losses(tmp_path / "long")  # constant lr: the same run
    assert (tmp_path / "short" / "config-000006.yaml").is_file()  # the record of the first 6 steps
    assert yaml.safe_load((tmp_path / "short" / "config.yaml").read_text())["training"]["total_steps"] == 12
    kinds = [json.loads(line)["kind"] for line in (tmp_path / "short" / "metrics.jsonl").read_text().splitlines()]
    assert "extend" in kinds
    # A shorter length is refused, naming the flag.
    assert main(["train", "--resume", str(tmp_path / "short"), "--steps", "8"]) == 2


def test_extend_appends_a_schedule(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(plain(tmp_path, "run", 6)))
    assert main(["train", str(run)]) == 0
    ext = tmp_path / "ext.yaml"
    ext.write_text(yaml.safe_dump({"schedule": [
        {"name": "grown", "start_step": 0, "end_step": 4,
         "model_config": {"grow": {"init": "identity"}, "trainable": "new"}, "optimizer_config": {"lr": 1e-3}},
    ]}))
    assert main(["train", "--resume", str(tmp_path / "run"), "--extend", str(ext)]) == 0
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert [(p["name"], p["start_step"], p["end_step"]) for p in saved["schedule"]] == [("main", 0, 6), ("grown", 6, 10)]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "transition" and r["to"] == "grown" and r["step"] == 6 for r in records)
    assert max(r["step"] for r in records if r["kind"] == "step") == 9


# ---- found by review: damaged or hostile sources, and extensions cut short ---------------------


def refused_source(tmp_path, capsys, folder, *words):
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump({"model": {"init_from": str(folder)}, "data": {},
                                    "training": {"batch_size": 4, "seq_len": 32, "total_steps": 2},
                                    "run": {"dir": str(tmp_path / "runs")}}))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "model.init_from" in err and all(w in err for w in words), err
    assert not (tmp_path / "runs").exists()


def test_damaged_hf_folders_are_one_message(tmp_path, capsys):
    import os

    from safetensors.torch import load_file, save_file

    hf_model(tmp_path / "m", max_shard_size="60KB")
    index = json.loads((tmp_path / "m" / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    os.rename(tmp_path / "m" / shard, tmp_path / "away")
    refused_source(tmp_path, capsys, tmp_path / "m", shard, "missing")
    os.mkfifo(tmp_path / "m" / shard)  # a FIFO would block the reader forever
    refused_source(tmp_path, capsys, tmp_path / "m", shard, "not a regular file")
    os.remove(tmp_path / "m" / shard)
    (tmp_path / "m" / shard).write_bytes((tmp_path / "away").read_bytes()[:1000])  # truncated
    refused_source(tmp_path, capsys, tmp_path / "m", shard, "cannot read the weights")
    tensors = load_file(str(tmp_path / "away"))
    next(iter(tensors.values())).view(-1)[0] = float("nan")
    save_file(tensors, str(tmp_path / "m" / shard), metadata={"format": "pt"})
    refused_source(tmp_path, capsys, tmp_path / "m", "NaN/Inf")
    (tmp_path / "m" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../../etc/passwd"}}))
    refused_source(tmp_path, capsys, tmp_path / "m", "outside the model folder")


@pytest.mark.parametrize("change, words", [
    ({"rope_theta": "5000", "rope_parameters": None}, "rope_theta='5000'"),
    ({"rope_parameters": {"rope_type": "default", "rope_theta": -1.0}}, "rope_theta=-1.0"),
    ({"rope_parameters": [1, 2]}, "rope_parameters"),
    ({"rms_norm_eps": "abc"}, "rms_norm_eps"),
    ({"max_position_embeddings": "abc"}, "max_position_embeddings"),
    ({"num_key_value_heads": [2]}, "num_key_value_heads"),
    ({"num_key_value_heads": 2.5}, "num_key_value_heads"),
    ({"head_dim": "16"}, "head_dim"),
    ({"tie_word_embeddings": "yes"}, "tie_word_embeddings"),
])
def test_bad_config_json_values_are_refused_not_guessed(tmp_path, capsys, change, words):
    hf_model(tmp_path / "m")
    body = {**json.loads((tmp_path / "m" / "config.json").read_text()), **change}
    (tmp_path / "m" / "config.json").write_text(json.dumps(body))
    refused_source(tmp_path, capsys, tmp_path / "m", words)


def test_a_deep_config_json_is_refused(tmp_path, capsys):
    hf_model(tmp_path / "m")
    (tmp_path / "m" / "config.json").write_text('{"model_type": "llama", "x": ' + "[" * 50_000 + "]" * 50_000 + "}")
    refused_source(tmp_path, capsys, tmp_path / "m", "nested too deeply")


def test_empty_init_from_and_a_lone_init_from_optimizer_are_errors():
    for model in ({"init_from": ""}, {"init_from_optimizer": True}):
        with pytest.raises(ConfigError, match=r"model\.init_from"):
            StackWiseConfig.from_dict({"model": model, "training": {}, "data": {}})


def test_the_start_says_what_was_loaded_and_added(tmp_path, capsys):
    hf_model(tmp_path / "llama")
    machine = TrainingMachine(config(tmp_path, tmp_path / "llama"), run_dir=tmp_path / "run")
    said = capsys.readouterr().err
    assert "started from" in said and "[PAD], [MASK]" in said and "vocabulary grows" in said
    machine.close()
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any(r["kind"] == "init_from" and r["added_tokens"] == ["[PAD]", "[MASK]"] for r in records)


def test_an_extension_cut_short_before_its_first_checkpoint_still_resumes(tmp_path):
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump(plain(tmp_path, "run", 6)))
    assert main(["train", str(run)]) == 0
    # The extension records its config, then dies before any new checkpoint (as a SIGKILL would).
    cut = TrainingMachine(tmp_path / "run" / "config.yaml", total_steps=12, resume=tmp_path / "run", console=False)
    cut.close()
    assert yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())["training"]["total_steps"] == 12
    assert main(["eval", str(tmp_path / "run"), "--batches", "1"]) == 0  # the step-6 checkpoint still fits
    assert main(["train", "--resume", str(tmp_path / "run")]) == 0
    assert max(losses(tmp_path / "run")) == 11
    # Checkpoints from before the extension stay usable: by eval, and as a source.
    first = tmp_path / "run" / "checkpoints" / "step_000006"
    source = TrainingMachine(config(tmp_path, first, steps=2), run_dir=tmp_path / "from-old", console=False)
    assert source.config.model.architecture.stack_sizes == [1]
    source.close()
