"""`stackwise export RUN --hf OUT`: the folder `transformers` loads as a Llama computes what the run
computes, and its tokenizer encodes as the run's does.

Tolerances: fp32 exports of dense runs compute the same operations in the same order as
stackwise, so their logits are expected within 1e-5 (measured: 0). QLoRA / NF4 runs export
dequant(W) + scale·B·A merged into one matrix, where stackwise adds the adapter's product to the
NF4 base's: the logits differ by float rounding only, expected within 1e-4 (measured ~1e-6).
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

transformers = pytest.importorskip("transformers", reason="transformers (a dev dependency) is needed to load exports")

from safetensors.torch import load_file  # noqa: E402

from stackwise.cli import main  # noqa: E402
from stackwise.interop.hf_export import ExportError, export_hf, parse_size, write_hf_folder  # noqa: E402
from stackwise.model import quant  # noqa: E402
from stackwise.model.lora import lora_layers  # noqa: E402
from stackwise.model.sampling import generate_causal  # noqa: E402
from stackwise.training.checkpoint import load_checkpoint  # noqa: E402
from stackwise.training.machine import TrainingMachine  # noqa: E402

DENSE_ATOL = 1e-5
MERGED_ATOL = 1e-4
TEXTS = [
    "def greet(name):\n    return f'Hello, {name}!'\n",
    "The quick brown fox jumps over the lazy dog. Ünïcödé ✓ — 日本語 😀\ttabs  and  spaces",
    "A literal [EOS] or [MASK] in a text stays text.",
]

SMALL_TEXT = "\n".join(
    f"Line {i}: the {w} of stack {i % 7} grows, freezes and is quantized as one unit; tokens {i * 13 % 97}."
    for i, w in enumerate(["rack", "block", "phase", "head", "embedding", "optimizer"] * 40)
)


def config(work: Path, name: str, *, model=None, data=None, schedule=None, steps: int = 4, **run) -> dict:
    return {
        "model": {"d_model": 32, "n_heads": 2, "max_seq_len": 64,
                  "architecture": {"n_stacks": 2, "blocks_per_stack": 1}, **(model or {})},
        "training": {"batch_size": 4, "seq_len": 32, "total_steps": steps, "seed": 0, "optimizer": {"lr": 3e-3}},
        "data": data or {},
        **({"schedule": schedule} if schedule else {}),
        "run": {"dir": str(work), "name": name, "device": "cpu", "eval_every": 100, "eval_batches": 1,
                "log_every": 100, **run},
    }


def train(cfg: dict) -> Path:
    machine = TrainingMachine(cfg, console=False)
    machine.train()
    return machine.run_dir


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture(scope="module")
def byte_run(work) -> Path:
    return train(config(work, "byte"))


@pytest.fixture(scope="module")
def gqa_run(work) -> Path:
    return train(config(work, "gqa", model={"n_heads": 4, "n_kv_heads": 2, "tie_embeddings": False, "rope_theta": 5e5}))


@pytest.fixture(scope="module")
def bpe_run(work) -> Path:
    corpus = work / "small.txt"
    corpus.write_text(SMALL_TEXT, encoding="utf-8")
    data = {"paths": [str(corpus)], "tokenizer": {"kind": "bpe", "vocab_size": 320}}
    return train(config(work, "bpe", model={"qkv_bias": True}, data=data))


class HFWarnings(logging.Handler):
    """Warnings `transformers` logs while loading (missing or unexpected weights, config problems)."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("transformers").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("transformers").removeHandler(self)


def load_hf(out: Path, tokenizer: bool = True):
    with HFWarnings() as caught:
        model = transformers.AutoModelForCausalLM.from_pretrained(out)
        tok = transformers.AutoTokenizer.from_pretrained(out) if tokenizer else None
    assert not caught.messages, caught.messages
    return model.eval(), tok


def hf_greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n)
    return out[0, len(prompt):].tolist()


def max_logits_diff(ours, hf, ids: list[int]) -> float:
    x = torch.tensor([ids])
    with torch.no_grad():
        return float((ours.eval()(x) - hf(x).logits).abs().max())


def check_equivalent(run_dir: Path, out: Path, atol: float = DENSE_ATOL, machine=None) -> float:
    """Logits, greedy generation and tokenizer of the export against the run's own (`machine`,
    default: the run's newest checkpoint); the max logits difference."""
    machine = machine or TrainingMachine.for_evaluation(run_dir)
    ours, tok = machine.model, machine.data.tokenizer
    hf, hf_tok = load_hf(out)
    worst = 0.0
    for text in TEXTS:
        ids = tok.encode(text)[:60]
        assert hf_tok(text)["input_ids"] == tok.encode(text)
        assert hf_tok.decode(tok.encode(text)) == text
        worst = max(worst, max_logits_diff(ours, hf, ids))
        prompt = ids[:16]
        assert hf_greedy(hf, prompt, 12) == generate_causal(ours, prompt, 12, temperature=0, stop_id=tok.eos_id)
    assert worst <= atol, worst
    assert hf_tok.eos_token_id == tok.eos_id and hf_tok.pad_token_id == tok.pad_id
    assert hf_tok.mask_token_id == tok.mask_id and hf_tok.bos_token_id is None
    assert hf.generation_config.eos_token_id == tok.eos_id
    print(f"{run_dir.name}: max |logits difference| {worst:.3g}")
    return worst


# ---- exports that load and agree ----------------------------------------------------------


def test_byte_run_exports_a_tied_llama(byte_run, tmp_path, capsys):
    out = tmp_path / "hf"
    assert main(["export", str(byte_run), "--hf", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "special_tokens_map.json",
        "tokenizer.json", "tokenizer_config.json"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"] is True
    assert (cfg["vocab_size"], cfg["num_hidden_layers"], cfg["max_position_embeddings"]) == (259, 2, 64)
    assert "lm_head.weight" not in load_file(out / "model.safetensors")  # written once, as the embedding
    check_equivalent(byte_run, out)
    hf, _ = load_hf(out, tokenizer=False)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # transformers ties it


def test_byte_tokenizer_matches_on_every_byte(byte_run, tmp_path):
    from stackwise.data.tokenizer import ByteTokenizer

    out = tmp_path / "hf"
    export_hf(byte_run, out)
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    ours = ByteTokenizer()
    every_char = "".join(chr(c) for c in range(1, 0x800)) + "\U0001f600"
    assert hf_tok(every_char)["input_ids"] == ours.encode(every_char)
    assert hf_tok.decode(ours.encode(every_char)) == every_char
    assert hf_tok.decode([104, 105, 258, 256], skip_special_tokens=True) == ours.decode([104, 105, 258, 256])


def test_gqa_untied_head_and_rope_theta(gqa_run, tmp_path):
    out = tmp_path / "hf"
    export_hf(gqa_run, out)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 8)
    assert cfg["tie_word_embeddings"] is False and cfg["rope_parameters"]["rope_theta"] == 5e5
    assert "lm_head.weight" in load_file(out / "model.safetensors")
    check_equivalent(gqa_run, out)


def test_bpe_run_with_qkv_bias(bpe_run, tmp_path):
    out = tmp_path / "hf"
    export_hf(bpe_run, out)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["attention_bias"] is True
    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.self_attn.q_proj.bias"].abs().sum() > 0  # trained, not zero
    assert not tensors["model.layers.0.self_attn.o_proj.bias"].any()  # Llama's o bias: zero
    assert json.loads((out / "tokenizer.json").read_text()) == json.loads((bpe_run / "tokenizer.json").read_text())
    check_equivalent(bpe_run, out)


def test_sharded_export_loads_and_equals(byte_run, tmp_path):
    out = tmp_path / "hf"
    assert main(["export", str(byte_run), "--hf", str(out), "--max-shard-size", "20KB"]) == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == files
    tensors = {k: v for f in files for k, v in load_file(out / f).items()}
    assert set(tensors) == set(index["weight_map"])
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    for f in files:  # a shard goes past the limit only when one tensor alone does
        shard = load_file(out / f)
        assert len(shard) == 1 or sum(t.numel() * 4 for t in shard.values()) <= 20_000
    check_equivalent(byte_run, out)


def test_bf16_export(gqa_run, tmp_path):
    out = tmp_path / "hf"
    export_hf(gqa_run, out, dtype="bf16")
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    tensors = load_file(out / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    hf, _ = load_hf(out)
    assert hf.dtype == torch.bfloat16
    ours = TrainingMachine.for_evaluation(gqa_run).model
    assert torch.equal(hf.lm_head.weight, ours.head.proj.weight.to(torch.bfloat16))


def test_write_hf_folder_with_a_foreign_tokenizer(tmp_path):
    """A pretrained-style tokenizer (its own end-of-text token, a BOS added by its post-processor,
    [PAD]/[MASK] added by stackwise): AutoTokenizer encodes as stackwise does (no BOS)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    from stackwise.config import StackWiseConfig
    from stackwise.data.tokenizer import BPETokenizer
    from stackwise.model import StackWiseModel

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    hf.train_from_iterator([SMALL_TEXT], trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|begin_of_text|>", "<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    hf.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                      special_tokens=[("<|begin_of_text|>", 0)])
    hf.save(str(tmp_path / "foreign.json"))
    tok = BPETokenizer.from_file(tmp_path / "foreign.json")
    assert tok.eos_id == hf.token_to_id("<|endoftext|>")
    cfg = StackWiseConfig.from_dict({"model": {"d_model": 32, "n_heads": 2, "max_seq_len": 64, "tie_embeddings": False,
                                               "architecture": {"n_stacks": 2, "blocks_per_stack": 1}},
                                     "training": {"seq_len": 32}, "data": {}}).model
    torch.manual_seed(0)
    model = StackWiseModel(cfg, vocab_size=tok.vocab_size + 4)  # a vocabulary padded past the tokenizer's
    out = write_hf_folder(model, tok, tmp_path / "hf", max_shard_size=10**6)
    assert json.loads((out / "tokenizer.json").read_text())["post_processor"] is None  # no BOS added
    hf_model, hf_tok = load_hf(out)
    assert hf_model.config.vocab_size == tok.vocab_size + 4
    assert (hf_tok.eos_token, hf_tok.pad_token_id, hf_tok.mask_token_id) == ("<|endoftext|>", tok.pad_id, tok.mask_id)
    for text in TEXTS:
        assert hf_tok(text)["input_ids"] == tok.encode(text)
        assert hf_tok.decode(tok.encode(text)) == text
    ids = tok.encode(TEXTS[1])[:60]
    assert max_logits_diff(model, hf_model, ids) <= DENSE_ATOL
    assert hf_greedy(hf_model, ids[:8], 10) == generate_causal(model, ids[:8], 10, temperature=0, stop_id=tok.eos_id)


# ---- QLoRA and NF4: exported dense ----------------------------------------------------------


# One run covers both: phase two grows a stack over an NF4-frozen trunk (its checkpoint at the
# transition to phase three holds it), phase three grows again with a QLoRA trunk (NF4 + LoRA).
GROWN = [
    {"name": "one", "start_step": 0, "end_step": 2},
    {"name": "two", "start_step": 2, "end_step": 4, "model_config": {
        "grow": {"n": 1, "init": "identity"}, "trainable": "new", "trunk": "frozen", "trunk_precision": "nf4"}},
    {"name": "three", "start_step": 4, "end_step": 6, "model_config": {
        "grow": {"n": 1, "init": "identity"}, "trainable": "new", "trunk": "qlora", "lora": {"rank": 4, "alpha": 8}}},
]


@pytest.fixture(scope="module")
def grown_run(work) -> Path:
    if not quant.nf4_available():
        pytest.skip("torchao (NF4) is not installed")
    model = {"d_model": 64, "n_heads": 4, "tie_embeddings": False, "architecture": {"n_stacks": 1, "blocks_per_stack": 1}}
    return train(config(work, "grown", model=model, schedule=GROWN, steps=6))


@pytest.mark.parametrize("trunk", ["nf4", "qlora"])
def test_qlora_and_nf4_runs_export_dense(trunk, grown_run, tmp_path):
    # step 4 ends phase two (NF4-frozen trunk); step 6 ends the run (QLoRA trunk)
    checkpoint = grown_run / "checkpoints" / ("step_000004" if trunk == "nf4" else "step_000006")
    out = tmp_path / "hf"
    export_hf(grown_run, out, checkpoint=checkpoint)
    machine = TrainingMachine.for_evaluation(grown_run, checkpoint=checkpoint)
    layers = dict(lora_layers(machine.model.rack[0]))
    assert quant.is_nf4(layers["blocks.0.attention.q"].weight)  # the run's trunk really is NF4
    assert layers["blocks.0.attention.q"].rank == (4 if trunk == "qlora" else 0)
    tensors = load_file(out / "model.safetensors")
    assert {t.dtype for t in tensors.values()} == {torch.float32}
    assert not [n for n in tensors if "lora" in n or "nf4" in n.lower()]
    for ours_name, hf_name in (("attention.q", "self_attn.q_proj"), ("mlp.down", "mlp.down_proj")):
        layer = layers[f"blocks.0.{ours_name}"]
        expected = quant.dequantize(layer.weight, torch.float32)
        if layer.rank:
            expected = expected + layer.scale * (layer.lora_B @ layer.lora_A)
        assert torch.allclose(tensors[f"model.layers.0.{hf_name}.weight"], expected, atol=1e-7, rtol=0)
    check_equivalent(grown_run, out, atol=MERGED_ATOL, machine=machine)


# ---- refusals -------------------------------------------------------------------------------


def refuse(argv: list[str], out: Path, capsys, needle: str) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("stackwise export: ") and len(err.splitlines()) == 1 and needle in err, err
    assert not out.exists()
    assert not list(out.parent.iterdir()), "a failed export leaves nothing behind"


def test_mla_is_refused(work, tmp_path, capsys):
    run = train(config(work, "mla", model={"attention": "mla", "mla": {"kv_rank": 8}}, steps=2))
    out = tmp_path / "parent" / "hf"
    out.parent.mkdir()
    refuse(["export", str(run), "--hf", str(out)], out, capsys, "mla")


def test_bidirectional_only_run_is_refused_unless_allowed(work, tmp_path, capsys):
    run = train(config(work, "mlm", data={"objective": "mlm"}, steps=2))
    out = tmp_path / "parent" / "hf"
    out.parent.mkdir()
    refuse(["export", str(run), "--hf", str(out)], out, capsys, "bidirectional")
    assert main(["export", str(run), "--hf", str(out), "--allow-bidirectional"]) == 0
    assert "warning" in capsys.readouterr().err and (out / "model.safetensors").is_file()
    load_hf(out)


def test_a_mixed_run_ending_causal_is_not_refused(work, tmp_path):
    schedule = [{"name": "mlm", "start_t": 0.0, "end_t": 0.5, "task": "mlm"},
                {"name": "clm", "start_t": 0.5, "end_t": 1.0, "task": "clm"}]
    run = train(config(work, "mixed", schedule=schedule, steps=2))
    assert export_hf(run, tmp_path / "hf").is_dir()


def test_non_empty_out_is_refused_and_left_alone(byte_run, tmp_path, capsys):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "mine.txt").write_text("keep me")
    assert main(["export", str(byte_run), "--hf", str(out)]) == 2
    err = capsys.readouterr().err
    assert "not empty" in err and len(err.strip().splitlines()) == 1
    assert [p.name for p in out.iterdir()] == ["mine.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert export_hf(byte_run, empty) == empty and (empty / "config.json").is_file()  # an empty one is fine


def test_run_without_checkpoint_is_refused(byte_run, tmp_path, capsys):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "config.yaml").write_text((byte_run / "config.yaml").read_text())
    out = tmp_path / "parent" / "hf"
    out.parent.mkdir()
    refuse(["export", str(run), "--hf", str(out)], out, capsys, "no checkpoint")
    refuse(["export", str(byte_run), "--hf", str(out), "--checkpoint", str(run / "nope")], out, capsys, "checkpoint")
    refuse(["export", str(tmp_path / "nowhere"), "--hf", str(out)], out, capsys, "not a run directory")


def test_bad_arguments():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("200KB") == 200_000 and parse_size("2GiB") == 2 * 2**30
    assert parse_size(1234) == 1234 and parse_size("1.5MB") == 1_500_000
    for bad in ("five", "0KB", "-3MB", "12XB"):
        with pytest.raises(ExportError, match="size"):
            parse_size(bad)


def test_stacks_of_different_widths_are_refused(byte_run, tmp_path):
    from stackwise.model.layers import SwiGLU

    machine = TrainingMachine.for_evaluation(byte_run)
    model = machine.model
    model.rack[1].blocks[0].mlp = SwiGLU(32, 64)  # another ffn width than layer 0's
    with pytest.raises(ExportError, match="layer 1 differs from layer 0"):
        write_hf_folder(model, machine.data.tokenizer, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


def test_dummy_data_run_exports_weights_without_tokenizer(work, tmp_path, capsys):
    run = train(config(work, "dummy", model={"vocab_size": 64}, data={"use_dummy_data": True}, steps=2))
    out = tmp_path / "hf"
    assert main(["export", str(run), "--hf", str(out)]) == 0
    assert "warning: no tokenizer" in capsys.readouterr().err
    assert not (out / "tokenizer.json").exists()
    hf, _ = load_hf(out, tokenizer=False)
    ours = TrainingMachine.for_evaluation(run).model
    assert max_logits_diff(ours, hf, list(range(40))) <= DENSE_ATOL


# ---- a sharded (DCP) checkpoint -------------------------------------------------------------


def test_dcp_checkpoint_exports(work, tmp_path):
    cfg = config(work, "dcp", steps=2)
    cfg["run"]["dir"] = str(tmp_path)
    path = tmp_path / "dcp.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "stackwise",
           "train", str(path)]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = tmp_path / "dcp"
    ckpt = sorted((run / "checkpoints").glob("step_*"))[-1]
    assert load_checkpoint(ckpt).sharded
    out = tmp_path / "hf"
    assert main(["export", str(run), "--hf", str(out), "--checkpoint", str(ckpt)]) == 0
    check_equivalent(run, out)


# ---- where OUT goes: refused before loading, permissions of a plain mkdir / open ------------


@pytest.fixture
def no_loading(monkeypatch):
    """Refusals of OUT come before the run is loaded (the expensive part)."""
    def fail(*args, **kwargs):
        raise AssertionError("the run was loaded before OUT was checked")
    monkeypatch.setattr(TrainingMachine, "for_evaluation", fail)


def left_over(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


@pytest.mark.parametrize("case", ["parent_is_a_file", "symlink_to_a_file", "dangling_symlink", "file_under_file"])
def test_out_that_cannot_be_a_folder_is_refused(case, byte_run, tmp_path, capsys, no_loading):
    place = tmp_path / "place"
    place.mkdir()
    (place / "file").write_text("keep me")
    out = {"parent_is_a_file": place / "file" / "hf", "file_under_file": place / "file" / "deeper" / "hf",
           "symlink_to_a_file": place / "link", "dangling_symlink": place / "link"}[case]
    if case == "symlink_to_a_file":
        out.symlink_to(place / "file")
    elif case == "dangling_symlink":
        out.symlink_to(place / "nowhere")
    before = left_over(place)
    assert main(["export", str(byte_run), "--hf", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"stackwise export: {out}: ") and len(err.splitlines()) == 1, err
    assert ("does not exist" if case == "dangling_symlink" else "not a folder") in err
    assert left_over(place) == before and (place / "file").read_text() == "keep me"


@pytest.mark.parametrize("out", ["/proc/x", "/sys/x", "/proc/x/y/hf"])
def test_out_in_an_unwritable_place_is_refused(out, byte_run, capsys, no_loading):
    """Read-only / pseudo file systems: root passes os.access() there, the probe does not."""
    root = Path(*Path(out).parts[:2])
    if not root.is_dir():
        pytest.skip(f"no {root} here")
    with pytest.raises(ExportError, match=f"{out}: cannot create a folder in {root} "):
        export_hf(byte_run, out)
    assert main(["export", str(byte_run), "--hf", out]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"stackwise export: {out}: cannot create a folder in") and len(err.splitlines()) == 1, err
    assert not Path(out).exists()


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes in a 0555 folder")
def test_out_under_a_read_only_folder_is_refused(byte_run, tmp_path, capsys, no_loading):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    try:
        assert main(["export", str(byte_run), "--hf", str(parent / "hf")]) == 2
        assert "Permission denied" in capsys.readouterr().err
        assert left_over(parent) == []
    finally:
        parent.chmod(0o755)


def test_symlink_to_an_empty_folder_exports_into_it(byte_run, tmp_path):
    real = tmp_path / "store" / "real"
    real.mkdir(parents=True)
    real.chmod(0o750)
    link = tmp_path / "link"
    link.symlink_to(real)
    assert main(["export", str(byte_run), "--hf", str(link)]) == 0
    assert link.is_symlink() and (real / "config.json").is_file()
    assert (real.stat().st_mode & 0o777) == 0o750  # the empty folder's own permissions are kept
    assert left_over(real.parent) == ["real"] and left_over(tmp_path) == ["link", "store"]
    check_equivalent(byte_run, link)


def test_a_failing_write_is_an_export_error_and_leaves_nothing(byte_run, tmp_path, monkeypatch):
    import errno

    from stackwise.interop import hf_export

    machine = TrainingMachine.for_evaluation(byte_run)
    empty = tmp_path / "empty"
    empty.mkdir()
    empty.chmod(0o701)

    def cross_device(src, dst):
        raise OSError(errno.EXDEV, os.strerror(errno.EXDEV), str(src))

    monkeypatch.setattr(hf_export.os, "replace", cross_device)
    with pytest.raises(ExportError, match=r"empty: cannot write the export \(Invalid cross-device link"):
        write_hf_folder(machine.model, machine.data.tokenizer, empty)
    assert left_over(tmp_path) == ["empty"] and left_over(empty) == []  # the empty OUT is put back, as it was
    assert (empty.stat().st_mode & 0o777) == 0o701
    monkeypatch.undo()

    def disk_full(folder, tensors, max_bytes):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(folder / "model.safetensors"))

    monkeypatch.setattr(hf_export, "_write_weights", disk_full)
    out = tmp_path / "new" / "deeper" / "hf"
    with pytest.raises(ExportError, match="No space left on device"):
        write_hf_folder(machine.model, machine.data.tokenizer, out)
    assert left_over(tmp_path) == ["empty"]  # the parents it made are gone too


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_exported_folder_has_the_permissions_of_a_plain_mkdir(umask, byte_run, tmp_path):
    old = os.umask(umask)
    try:
        out = export_hf(byte_run, tmp_path / "hf")
        kept = tmp_path / "kept"
        kept.mkdir()
        kept.chmod(0o711)
        export_hf(byte_run, kept)
    finally:
        os.umask(old)
    assert (out.stat().st_mode & 0o777) == 0o777 & ~umask
    assert {p.name: p.stat().st_mode & 0o777 for p in out.iterdir()} == dict.fromkeys(
        (p.name for p in out.iterdir()), 0o666 & ~umask)
    assert (kept.stat().st_mode & 0o777) == 0o711 and (kept / "config.json").is_file()
