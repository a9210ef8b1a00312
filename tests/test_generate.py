"""Generation: causal sampling and iterative unmasking on a tiny model, and `stackwise generate`
end to end on freshly trained clm and diffusion runs."""

import pytest
import torch
import yaml

from stackwise.cli import main
from stackwise.config import StackWiseConfig
from stackwise.data.tokenizer import ByteTokenizer
from stackwise.model import KVCache, StackWiseModel
from stackwise.model.sampling import generate_causal, generate_masked, generate_text, unmask_schedule

TOK = ByteTokenizer()
SPECIALS = [TOK.pad_id, TOK.mask_id]
PROMPT = TOK.encode("def ")


def tiny_model(max_seq_len: int = 64, **extra) -> StackWiseModel:
    model = {"vocab_size": 259, "d_model": 32, "n_heads": 2, "max_seq_len": max_seq_len,
             "architecture": {"n_stacks": 1, "blocks_per_stack": 1}, **extra}
    cfg = StackWiseConfig.from_dict({"model": model, "training": {"seq_len": 8}, "data": {}}).model
    torch.manual_seed(0)
    return StackWiseModel(cfg)


@pytest.fixture(scope="module")
def model():
    return tiny_model()


# ---- causal ---------------------------------------------------------------------------------


def test_causal_length_and_seed_reproducibility(model):
    a = generate_causal(model, PROMPT, 12, seed=3, banned_ids=SPECIALS)
    assert len(a) == 12 and all(0 <= i < 259 for i in a)
    assert a == generate_causal(model, PROMPT, 12, seed=3, banned_ids=SPECIALS)
    assert a != generate_causal(model, PROMPT, 12, seed=4, banned_ids=SPECIALS)


def test_greedy_is_deterministic_and_equals_top_k_1(model):
    greedy = generate_causal(model, PROMPT, 10, temperature=0)
    assert greedy == generate_causal(model, PROMPT, 10, temperature=0, seed=99)
    assert greedy == generate_causal(model, PROMPT, 10, top_k=1, seed=5)
    # The first greedy token is the argmax of the model's own forward pass.
    with torch.no_grad():
        assert greedy[0] == int(model(torch.tensor([PROMPT]))[0, -1].argmax())


def test_banned_ids_never_appear(model):
    # Ban everything but a handful of ids: every sample must come from the rest.
    allowed = {97, 98, 99}
    out = generate_causal(model, PROMPT, 30, seed=0, banned_ids=[i for i in range(259) if i not in allowed])
    assert set(out) <= allowed


def test_stop_id_ends_generation(model):
    first = generate_causal(model, PROMPT, 5, temperature=0)[0]
    assert generate_causal(model, PROMPT, 5, temperature=0, stop_id=first) == [first]


def test_context_is_cropped_past_max_seq_len():
    small = tiny_model(max_seq_len=8)
    out = generate_causal(small, TOK.encode("a long prompt past the window"), 20, seed=0)
    assert len(out) == 20
    # Greedy continuation depends on the last 8 ids only.
    assert generate_causal(small, TOK.encode("xyz window"), 3, temperature=0) == generate_causal(
        small, TOK.encode("ow window"), 3, temperature=0
    )


ATTENTIONS = {
    "mha": {},
    "gqa": {"n_heads": 4, "n_kv_heads": 2},
    "mla": {"attention": "mla", "mla": {"kv_rank": 8, "q_rank": 16}},
}


@pytest.mark.parametrize("attention", list(ATTENTIONS))
def test_kv_cache_gives_the_logits_of_the_whole_context(attention):
    model = tiny_model(max_seq_len=16, architecture={"n_stacks": 2, "blocks_per_stack": 2}, **ATTENTIONS[attention]).eval()
    ids = torch.randint(0, 259, (2, 16), generator=torch.Generator().manual_seed(0))
    cache = KVCache(16)
    with torch.no_grad():
        full = model(ids)
        pieces = [(0, 5), (5, 6), (6, 7), (7, 11), (11, 16)]  # a prompt, single tokens, a chunk
        for start, end in pieces:
            hidden = model.rack(model.embedding(ids[:, start:end]), "causal", cache=cache)
            torch.testing.assert_close(model.head(hidden), full[:, start:end], rtol=1e-5, atol=1e-5)
    assert cache.length == 16
    with torch.no_grad(), pytest.raises(ValueError, match=r"exceeds model\.max_seq_len=16"):
        model.rack(model.embedding(ids[:, :1]), "causal", cache=cache)
    with torch.no_grad(), pytest.raises(ValueError, match="holds 4 positions; 5 were asked for"):
        model.rack(model.embedding(ids[:, :5]), "causal", cache=KVCache(4))
    with pytest.raises(ValueError, match="causal attention over the whole rack"):
        model.rack(model.embedding(ids), "bidirectional", cache=KVCache(16))
    with torch.no_grad(), pytest.raises(ValueError, match="one cache per batch"):
        model.rack(model.embedding(ids[:1, :3]), "causal", cache=cache_after(model, ids[:, :2]))
    with pytest.raises(ValueError, match="for inference"):
        model.rack(model.embedding(ids[:, :2]), "causal", cache=KVCache(16))


def cache_after(model: StackWiseModel, ids: torch.Tensor) -> KVCache:
    cache = KVCache(model.cfg.max_seq_len)
    model.rack(model.embedding(ids), "causal", cache=cache)
    return cache


def test_kv_cache_refuses_a_layer_run_twice_in_one_pass():
    model = tiny_model(max_seq_len=16).eval()
    model.rack.insert(1, model.rack[0])  # the same stack object at two positions
    with torch.no_grad(), pytest.raises(ValueError, match="ran twice in one pass"):
        model.rack(model.embedding(torch.tensor([[1, 2, 3]])), "causal", cache=KVCache(16))


def test_kv_cache_in_a_bf16_stack():
    model = tiny_model(max_seq_len=16, architecture={"n_stacks": 2, "blocks_per_stack": 1}).eval()
    model.rack[0].to(torch.bfloat16)  # a stack stored in bf16 computes (and caches) in bf16
    ids = torch.randint(0, 259, (1, 10), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(ids)
        cache = cache_after(model, ids[:, :6])
        for position in range(6, 10):
            last = model.head(model.rack(model.embedding(ids[:, position : position + 1]), "causal", cache=cache))
            torch.testing.assert_close(last, full[:, position : position + 1], rtol=0, atol=0.05)


@pytest.mark.parametrize("attention", list(ATTENTIONS))
def test_generation_with_and_without_the_cache_agree(attention):
    # max_seq_len 12, prompt 5, 15 new tokens: the cache serves the first steps, then the window slides.
    model = tiny_model(max_seq_len=12, **ATTENTIONS[attention])
    for kwargs in ({"temperature": 0}, {"seed": 3}):
        cached = generate_causal(model, PROMPT + TOK.encode("x"), 15, **kwargs)
        assert cached == generate_causal(model, PROMPT + TOK.encode("x"), 15, kv_cache=False, **kwargs)


def test_causal_restores_train_mode_and_rejects_bad_arguments(model):
    model.train()
    generate_causal(model, PROMPT, 2, seed=0)
    assert model.training
    model.eval()
    for kwargs in ({"temperature": -1.0}, {"top_k": 0}):
        with pytest.raises(ValueError):
            generate_causal(model, PROMPT, 2, **kwargs)
    with pytest.raises(ValueError, match="prompt"):
        generate_causal(model, [], 2)


# ---- masked ---------------------------------------------------------------------------------


def test_schedule_is_linear_and_unmasks_everything():
    assert unmask_schedule(20, 16) == [20 * s // 16 - 20 * (s - 1) // 16 for s in range(1, 17)]
    for length, steps in [(20, 16), (3, 16), (7, 1), (16, 4)]:
        assert sum(unmask_schedule(length, steps)) == length
    assert unmask_schedule(16, 4) == [4, 4, 4, 4]


@pytest.mark.parametrize("strategy", ["confidence", "random"])
def test_masked_fills_every_position_reproducibly(model, strategy):
    kwargs = {"mask_id": TOK.mask_id, "steps": 4, "seed": 1, "banned_ids": SPECIALS, "strategy": strategy}
    out = generate_masked(model, PROMPT, 10, **kwargs)
    assert len(out) == 10 and TOK.mask_id not in out and TOK.pad_id not in out
    assert out == generate_masked(model, PROMPT, 10, **kwargs)


def test_masked_leaves_the_prompt_alone(model):
    seen = []
    hook = model.embedding.register_forward_hook(lambda m, args, out: seen.append(args[0][0].clone()))
    try:
        generate_masked(model, PROMPT, 6, mask_id=TOK.mask_id, steps=3, seed=0)
    finally:
        hook.remove()
    assert len(seen) == 3
    for ids in seen:  # every round sees the prompt unchanged, and fewer masks than the last
        assert ids[: len(PROMPT)].tolist() == PROMPT
    assert [int((ids == TOK.mask_id).sum()) for ids in seen] == [6, 4, 2]


def test_masked_one_step_and_greedy(model):
    out = generate_masked(model, PROMPT, 8, mask_id=TOK.mask_id, steps=1, temperature=0)
    assert len(out) == 8 and TOK.mask_id not in out
    # One greedy round is the argmax of one bidirectional forward over prompt + masks.
    with torch.no_grad():
        logits = model(torch.tensor([PROMPT + [TOK.mask_id] * 8]), attention_mode="bidirectional")
    logits[..., TOK.mask_id] = float("-inf")
    assert out == logits[0, len(PROMPT):].argmax(-1).tolist()


def test_masked_rejects_sequences_past_max_seq_len(model):
    with pytest.raises(ValueError, match="max_seq_len=64"):
        generate_masked(model, PROMPT, 61, mask_id=TOK.mask_id)


def test_generate_text_decodes_only_the_new_part(model):
    text = generate_text(model, TOK, "def ", objective="clm", max_new_tokens=8, seed=0)
    assert isinstance(text, str) and not text.startswith("def ")
    with pytest.raises(ValueError, match="objective"):
        generate_text(model, TOK, "def ", objective="seq2seq")


# ---- the command line -----------------------------------------------------------------------


def train_run(root, objective: str):
    cfg = {
        "model": {"d_model": 32, "n_heads": 2, "max_seq_len": 64, "architecture": {"n_stacks": 1, "blocks_per_stack": 1}},
        "training": {"batch_size": 4, "seq_len": 32, "total_steps": 4},
        "data": {"objective": objective},
        "run": {"dir": str(root), "name": objective, "eval_batches": 1},
    }
    path = root / f"{objective}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path)]) == 0
    return root / objective


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("runs")
    return {objective: train_run(root, objective) for objective in ("clm", "diffusion")}


@pytest.mark.parametrize("objective", ["clm", "diffusion"])
def test_cli_generates_text(runs, objective, capsys):
    capsys.readouterr()
    argv = ["generate", str(runs[objective]), "--prompt", "def ", "--max-new-tokens", "20", "--seed", "0"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("def ") and out.rstrip("\n") != "def "
    assert main(argv) == 0 and capsys.readouterr().out == out  # the seed makes it reproducible


@pytest.mark.parametrize(
    "extra",
    [
        ["--prompt", ""],
        ["--prompt", "x", "--temperature", "-0.5"],
        ["--prompt", "x", "--max-new-tokens", "0"],
        ["--prompt", "x", "--top-k", "0"],
        ["--prompt", "x", "--steps", "-1"],
        ["--prompt", "x", "--max-new-tokens", "100"],  # diffusion: 1 + 100 > max_seq_len 64
    ],
)
def test_cli_rejects_bad_arguments(runs, extra, capsys):
    assert main(["generate", str(runs["diffusion"]), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("stackwise generate:") and len(err.strip().splitlines()) == 1


def test_cli_rejects_missing_and_broken_runs(runs, tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "--prompt", "x"]) == 2
    assert "not a run directory" in capsys.readouterr().err
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.yaml").write_text((runs["clm"] / "config.yaml").read_text())
    assert main(["generate", str(broken), "--prompt", "x"]) == 2
    assert "no usable checkpoint" in capsys.readouterr().err
