"""Specs: exact round trips (also through JSON), validation rules, and cross-plane checks."""

import dataclasses
import json

import pytest

from stackwise.config import StackWiseConfig
from stackwise.framework import (
    BatchSpec,
    DataSpec,
    EmbeddingSpec,
    HeadSpec,
    ModelSpec,
    OptimizerSpec,
    RackSpec,
    SpecError,
    validate_training_state,
)
from stackwise.model import StackWiseModel


def rack_spec(**kw):
    base = dict(n_stacks=2, blocks_per_stack=[2, 2], d_model=64, n_heads=4, n_kv_heads=2, attention="gqa",
                ffn_hidden=176, max_seq_len=128, roles=["frozen", "trainable"], precisions=["nf4", "fp32"])
    return RackSpec(**{**base, **kw})


SPECS = [
    BatchSpec(batch_size=4, seq_len=128, vocab_size=259, objective="mlm", attention_mode="bidirectional", mask_rate=0.15),
    DataSpec(corpus="builtin", tokenizer="bpe", vocab_size=4096, seq_len=256, batch_size=8, objective="diffusion",
             mask_range=(0.1, 0.9), val_fraction=0.05, seed=3),
    EmbeddingSpec(vocab_size=4096, d_model=64, tied=False, frozen=True),
    rack_spec(),
    HeadSpec(d_model=64, vocab_size=4096, tied=True, frozen=False),
    ModelSpec(EmbeddingSpec(300, 64), rack_spec(), HeadSpec(64, 300), trainable_parameters=["a.weight", "b.weight"]),
    OptimizerSpec(optimizer_type="AdamW", lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), grad_clip=1.0,
                  param_names=["a", "b"], groups={"decay": ["a"], "no_decay": ["b"]}),
]


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: type(s).__name__)
def test_round_trip_is_exact(spec):
    spec.validate()
    assert type(spec).from_dict(spec.to_dict()) == spec
    through_json = json.loads(json.dumps(spec.to_dict()))
    assert type(spec).from_dict(through_json) == spec


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: type(s).__name__)
def test_from_dict_refuses_unknown_and_missing_fields(spec):
    data = {**spec.to_dict(), "colour": "red"}
    with pytest.raises(SpecError, match="colour"):
        type(spec).from_dict(data)
    required = [f.name for f in dataclasses.fields(spec) if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if not required:  # every field has a default (OptimizerSpec)
        assert type(spec).from_dict({}) == type(spec)()
        return
    first_required = required[0]
    data = spec.to_dict()
    del data[first_required]
    with pytest.raises(SpecError, match=first_required):
        type(spec).from_dict(data)


INVALID = [
    (BatchSpec(batch_size=0, seq_len=8, vocab_size=10), "batch_size", "0"),
    (BatchSpec(batch_size=2, seq_len=-8, vocab_size=10), "seq_len", "-8"),
    (BatchSpec(batch_size=2, seq_len=8, vocab_size=10, objective="gan"), "objective", "gan"),
    (BatchSpec(batch_size=2, seq_len=8, vocab_size=10, attention_mode="sideways"), "attention_mode", "sideways"),
    (BatchSpec(batch_size=2, seq_len=8, vocab_size=10, objective="clm", attention_mode="bidirectional"), "attention_mode", "bidirectional"),
    (BatchSpec(batch_size=2, seq_len=8, vocab_size=10, objective="mlm", attention_mode="bidirectional"), "mask_rate", "mlm"),
    (BatchSpec(batch_size=2, seq_len=8, vocab_size=10, objective="mlm", attention_mode="bidirectional", mask_rate=1.5), "mask_rate", "1.5"),
    (DataSpec(corpus="", tokenizer="byte", vocab_size=259, seq_len=8, batch_size=2), "corpus", "''"),
    (DataSpec(corpus="x", tokenizer="wordpiece", vocab_size=259, seq_len=8, batch_size=2), "tokenizer", "wordpiece"),
    (DataSpec(corpus="x", tokenizer="byte", vocab_size=259, seq_len=8, batch_size=2, mask_range=(0.9, 0.1)), "mask_range", "0.9"),
    (DataSpec(corpus="x", tokenizer="byte", vocab_size=259, seq_len=8, batch_size=2, val_fraction=0.0), "val_fraction", "0.0"),
    (EmbeddingSpec(vocab_size=0, d_model=64), "vocab_size", "0"),
    (HeadSpec(d_model=64, vocab_size=-1), "vocab_size", "-1"),
    (rack_spec(n_stacks=3), "blocks_per_stack", "n_stacks=3"),
    (rack_spec(roles=["frozen", "sleeping"]), "roles[1]", "sleeping"),
    (rack_spec(precisions=["fp32", "int3"]), "precisions[1]", "int3"),
    (rack_spec(n_heads=5), "n_heads", "5"),
    (rack_spec(n_kv_heads=3), "n_kv_heads", "3"),
    (rack_spec(attention="flash"), "attention", "flash"),
    (rack_spec(blocks_per_stack=[2, 0]), "blocks_per_stack[1]", "0"),
    (OptimizerSpec(optimizer_type="Adagrad"), "optimizer_type", "Adagrad"),
    (OptimizerSpec(lr=-1.0), "lr", "-1.0"),
    (OptimizerSpec(lr=float("nan")), "lr", "nan"),
    (OptimizerSpec(betas=(0.9, 1.0)), "betas", "1.0"),
    (OptimizerSpec(weight_decay=-0.5), "weight_decay", "-0.5"),
    (OptimizerSpec(momentum=1.2), "momentum", "1.2"),
    (OptimizerSpec(grad_clip=0.0), "grad_clip", "0.0"),
    (OptimizerSpec(param_names=["a", "a"]), "param_names", "'a'"),
    (OptimizerSpec(param_names=["a", "b"], groups={"decay": ["a"]}), "groups", "partition"),
]


@pytest.mark.parametrize(("spec", "field", "shown"), INVALID, ids=[f"{type(s).__name__}.{f}" for s, f, _ in INVALID])
def test_validate_names_field_and_value(spec, field, shown):
    with pytest.raises(SpecError) as err:
        spec.validate()
    message = str(err.value)
    assert f"{type(spec).__name__}.{field}" in message
    assert shown in message


def _tiny_model(**model):
    cfg = StackWiseConfig.from_dict(
        {"model": {"vocab_size": 300, "d_model": 64, "n_heads": 4, "max_seq_len": 64, **model},
         "training": {"seq_len": 32}, "data": {}}
    )
    return StackWiseModel(cfg.model)


def _optimizer_for(model):
    return OptimizerSpec(param_names=sorted(n for n, p in model.named_parameters() if p.requires_grad))


def test_fitting_state_passes_and_objects_stand_in_for_specs():
    model = _tiny_model()
    batch = BatchSpec(batch_size=2, seq_len=32, vocab_size=259)
    validate_training_state(batch, model.to_spec(), _optimizer_for(model))
    validate_training_state(batch, model, _optimizer_for(model))  # anything with to_spec()


def test_every_mismatch_is_listed_at_once():
    model = _tiny_model()
    model.rack[0].freeze()
    stale_optimizer = OptimizerSpec(param_names=sorted(n for n, _ in model.named_parameters()))  # includes frozen
    batch = BatchSpec(batch_size=2, seq_len=128, vocab_size=5000, objective="mlm", attention_mode="causal", mask_rate=0.15)
    with pytest.raises(SpecError) as err:
        validate_training_state(batch, model.to_spec(), stale_optimizer)
    fields = [f for f, _ in err.value.problems]
    assert "data.vocab_size" in fields
    assert "data.seq_len" in fields
    assert "data.attention_mode" in fields
    assert "optimizer.param_names" in fields
    assert "rack.stacks.0" in str(err.value)  # names the parameters that should not be updated


def test_optimizer_missing_trainable_parameters_is_named():
    model = _tiny_model()
    names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
    with pytest.raises(SpecError, match="misses trainable parameters"):
        validate_training_state(BatchSpec(2, 32, 259), model.to_spec(), OptimizerSpec(param_names=names[1:]))


def test_disagreeing_widths_and_vocabularies():
    spec = ModelSpec(EmbeddingSpec(300, 64), rack_spec(d_model=128, n_heads=4), HeadSpec(64, 301), ["x"])
    with pytest.raises(SpecError) as err:
        validate_training_state(BatchSpec(2, 32, 259), spec, OptimizerSpec(param_names=["x"]))
    fields = [f for f, _ in err.value.problems]
    assert "head.vocab_size" in fields and "rack.d_model" in fields


def test_data_spec_gives_its_batch_spec():
    data = DataSpec(corpus="builtin", tokenizer="byte", vocab_size=259, seq_len=16, batch_size=2, objective="mlm", mask_rate=0.2)
    batch = data.batch_spec()
    assert batch.attention_mode == "bidirectional" and batch.mask_rate == 0.2
    batch.validate()
