"""Model plane: shapes, attention modes, parameter formulas, slicing, and a tiny model that learns."""

import pydoc_data.topics

import pytest
import torch
import torch.nn.functional as F

from stackwise.config import StackWiseConfig
from stackwise.model import Block, Rack, StackWiseModel

KINDS = {
    "mha": {},
    "gqa": {"n_kv_heads": 2},
    "mla": {"attention": "mla", "mla": {"kv_rank": 16}},
    "mla_qrank": {"attention": "mla", "mla": {"kv_rank": 16, "q_rank": 24, "rope_dim": 4}},
}


def model_config(**model):
    base = {"vocab_size": 300, "d_model": 64, "n_heads": 4, "architecture": {"n_stacks": 2, "blocks_per_stack": 1}}
    training = {"seq_len": 8}
    return StackWiseConfig.from_dict({"model": {**base, **model}, "training": training, "data": {}}).model


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["causal", "bidirectional"])
def test_output_shapes(kind, mode):
    torch.manual_seed(0)
    model = StackWiseModel(model_config(**KINDS[kind]))
    ids = torch.randint(0, 300, (3, 17))
    logits, hidden = model(ids, attention_mode=mode, return_hidden=True)
    assert logits.shape == (3, 17, 300)
    assert hidden.shape == (3, 17, 64)
    assert torch.isfinite(logits).all()


@pytest.mark.parametrize("kind", KINDS)
def test_causal_mode_never_looks_ahead_and_bidirectional_does(kind):
    torch.manual_seed(0)
    model = StackWiseModel(model_config(**KINDS[kind])).eval()
    ids = torch.randint(0, 300, (2, 12))
    changed = ids.clone()
    j = 7
    changed[:, j] = (ids[:, j] + 1) % 300
    with torch.no_grad():
        for mode in ("causal", "bidirectional"):
            a, b = model(ids, attention_mode=mode), model(changed, attention_mode=mode)
            diff = (a - b).abs().amax(dim=(0, 2))  # per position
            if mode == "causal":
                assert diff[:j].max() == 0, "a causal position saw a later token"
            else:
                assert diff[:j].max() > 1e-4, "bidirectional positions should see later tokens"
            assert diff[j:].min() > 0


def test_bad_attention_mode_is_refused():
    model = StackWiseModel(model_config())
    with pytest.raises(ValueError, match="attention_mode"):
        model(torch.zeros(1, 4, dtype=torch.long), attention_mode="sideways")


def _expected_block_params(d, H, kv, hd, ffn, attention, kv_rank=None, q_rank=None, rope_dim=None):
    """The formulas documented in docs/model.md, written out independently of the code."""
    mlp = 3 * d * ffn  # gate, up, down
    norms = 2 * d
    if attention in ("mha", "gqa"):
        attn = d * H * hd + 2 * d * kv * hd + H * hd * d  # q, k, v, o
    else:
        q_width = H * (hd + rope_dim)
        q = d * q_width if q_rank is None else d * q_rank + q_rank + q_rank * q_width
        attn = q + d * kv_rank + kv_rank + 2 * kv_rank * H * hd + d * rope_dim + H * hd * d
    return attn + mlp + norms


@pytest.mark.parametrize(
    ("model_kwargs", "formula_kwargs"),
    [
        ({}, {"attention": "mha", "kv": 4}),
        ({"n_kv_heads": 2}, {"attention": "gqa", "kv": 2}),
        ({"n_kv_heads": 1}, {"attention": "gqa", "kv": 1}),
        ({"attention": "mla", "mla": {"kv_rank": 16}}, {"attention": "mla", "kv": 4, "kv_rank": 16, "rope_dim": 8}),
        (
            {"attention": "mla", "mla": {"kv_rank": 16, "q_rank": 24, "rope_dim": 4}},
            {"attention": "mla", "kv": 4, "kv_rank": 16, "q_rank": 24, "rope_dim": 4},
        ),
    ],
)
def test_parameter_counts_match_the_formula(model_kwargs, formula_kwargs):
    cfg = model_config(**model_kwargs)
    block = Block(cfg)
    expected = _expected_block_params(d=64, H=4, hd=16, ffn=176, **formula_kwargs)
    assert sum(p.numel() for p in block.parameters()) == expected
    model = StackWiseModel(cfg)
    # Embedding (tied head) + final norm + 2 blocks.
    assert model.num_parameters() == 300 * 64 + 64 + 2 * expected


def test_gqa_and_mla_are_smaller_than_mha():
    sizes = {k: sum(p.numel() for p in Block(model_config(**v)).parameters()) for k, v in KINDS.items()}
    assert sizes["gqa"] < sizes["mha"]
    assert sizes["mla"] < sizes["mha"]


def test_untied_head_has_its_own_weight():
    model = StackWiseModel(model_config(tie_embeddings=False))
    assert not model.tied
    assert model.num_parameters() == StackWiseModel(model_config()).num_parameters() + 300 * 64


def test_forward_from_composes_to_the_full_forward():
    torch.manual_seed(0)
    model = StackWiseModel(model_config(architecture={"n_stacks": 3, "blocks_per_stack": 1})).eval()
    ids = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        logits, hidden = model(ids, return_hidden=True)
        trunk = model.forward_from(model.embedding(ids), 0, 2)
        top = model.forward_from(trunk, 2)
        assert torch.allclose(top, hidden, atol=1e-6)
        assert torch.allclose(model.head(top), logits, atol=1e-6)
    with pytest.raises(IndexError):
        model.forward_from(hidden, 2, 5)


def test_sequence_longer_than_positions_is_refused():
    model = StackWiseModel(model_config(max_seq_len=8))
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.zeros(1, 9, dtype=torch.long))


def test_rack_spec_reports_structure_roles_and_precision():
    cfg = model_config(architecture={"n_stacks": 3, "blocks_per_stack": 2}, n_kv_heads=2)
    rack = Rack(cfg)
    rack[0].freeze()
    rack[1].precision = "bf16"
    spec = rack.to_spec()
    spec.validate()
    assert spec.n_stacks == 3 and spec.blocks_per_stack == [2, 2, 2] and spec.n_blocks == 6
    assert spec.d_model == 64 and spec.n_kv_heads == 2 and spec.attention == "gqa"
    assert spec.frozen_stacks == [0] and spec.trainable_stacks == [1, 2]
    assert spec.precisions == ["fp32", "bf16", "fp32"]
    assert not any(p.requires_grad for p in rack[0].parameters())


def test_model_spec_lists_trainable_parameters():
    model = StackWiseModel(model_config())
    model.rack[0].freeze()
    spec = model.to_spec()
    assert spec.embedding.tied and spec.head.tied
    assert not any(n.startswith("rack.stacks.0.") for n in spec.trainable_parameters)
    assert "rack.stacks.1.blocks.0.attention.q.weight" in spec.trainable_parameters
    assert "embedding.tokens.weight" in spec.trainable_parameters


def test_tiny_model_overfits_one_batch_of_real_text():
    torch.manual_seed(0)
    text = "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
    data = torch.tensor(list(text.encode("utf-8")[: 4 * 65]), dtype=torch.long).view(4, 65)
    inputs, targets = data[:, :-1], data[:, 1:]
    model = StackWiseModel(model_config(vocab_size=256))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    losses = []
    for _ in range(200):
        loss = F.cross_entropy(model(inputs).flatten(0, 1), targets.flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 4.0  # starts near ln(256) ≈ 5.5
    assert min(losses) < 0.5, f"did not overfit: last losses {losses[-5:]}"


def test_inserting_a_stack_keeps_existing_parameter_names():
    rack = Rack(model_config(architecture={"n_stacks": 2, "blocks_per_stack": 1}))
    before = {n: p for n, p in rack.named_parameters()}
    new_id = rack.insert(0, type(rack[0])(rack.cfg))
    after = dict(rack.named_parameters())
    assert rack.stack_ids == [new_id, "0", "1"]
    for name, param in before.items():
        assert after[name] is param
    assert rack.to_spec().stack_ids == [new_id, "0", "1"]
