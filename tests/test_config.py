"""Config: the DESIGN.md short form, defaults, round trips, overrides and a malformed-input fuzz."""

import pytest
import yaml

from stackwise.config import ConfigError, StackWiseConfig, check_schedule
from tests.conftest import SHORT_FORM_YAML

BASE = {"model": {"d_model": 64, "n_heads": 4}, "training": {}, "data": {}}


def test_short_form_loads_with_every_default_filled(short_form_path):
    cfg = StackWiseConfig.from_yaml(short_form_path)
    assert cfg.model.vocab_size == 1000
    assert cfg.model.n_kv_heads == 8 and cfg.model.attention == "mha"
    assert cfg.model.ffn_hidden == 688  # 8/3 · 256 rounded up to 16
    assert cfg.training.optimizer.lr == 1e-4
    assert [p.name for p in cfg.schedule] == ["warmup", "main"]
    assert cfg.schedule[0].optimizer_config.lr == 1e-5
    assert cfg.run.device == "auto"


def test_short_form_round_trips_through_yaml(short_form_path, tmp_path):
    cfg = StackWiseConfig.from_yaml(short_form_path)
    out = tmp_path / "resolved.yaml"
    cfg.to_yaml(out)
    again = StackWiseConfig.from_yaml(out)
    assert again == cfg
    assert again.to_dict() == cfg.to_dict()
    # The resolved file is itself stable: writing it again gives the same text.
    assert again.to_yaml() == out.read_text()


def test_from_dict_and_load_accept_every_form(short_form_path):
    as_dict = yaml.safe_load(SHORT_FORM_YAML)
    a = StackWiseConfig.from_dict(as_dict)
    assert StackWiseConfig.load(as_dict) == a
    assert StackWiseConfig.load(str(short_form_path)) == a
    assert StackWiseConfig.load(a) is a


def test_overrides_parse_yaml_scalars(short_form_path):
    cfg = StackWiseConfig.from_yaml(short_form_path)
    new = cfg.with_overrides(["training.lr=3e-4", "model.architecture.n_stacks=4", "run.compile=true", "schedule.1.name=late"])
    assert new.training.optimizer.lr == pytest.approx(3e-4)
    assert new.model.architecture.n_stacks == 4
    assert new.run.compile is True
    assert new.schedule[1].name == "late"
    assert cfg.training.optimizer.lr == 1e-4  # the original is untouched


def test_override_errors_name_the_key(short_form_path):
    cfg = StackWiseConfig.from_yaml(short_form_path)
    with pytest.raises(ConfigError) as err:
        cfg.with_overrides(["model.d_modle=3"])
    assert "model.d_modle" in err.value.paths
    with pytest.raises(ConfigError) as err:
        cfg.with_overrides(["no_equals_sign"])
    assert "no_equals_sign" in str(err.value)


def test_ramp_and_lr_schedule_values():
    cfg = StackWiseConfig.from_dict(
        {**BASE, "training": {"optimizer": {"lr": {"schedule": "cosine", "peak": 3e-4, "final": 3e-5, "warmup": 0.05}}},
         "data": {"objective": "mlm", "mask_rate": {"start": 0.15, "end": 0.5}}}
    )
    assert cfg.training.optimizer.lr.at(0.025) == pytest.approx(1.5e-4)
    assert cfg.data.mask_rate.at(0.5) == pytest.approx(0.325)


def test_all_errors_reported_at_once():
    bad = {"model": {"d_model": "wide", "n_heads": 0}, "training": {"batch_size": -1}, "data": {"objective": "gan"}}
    with pytest.raises(ConfigError) as err:
        StackWiseConfig.from_dict(bad)
    assert {"model.d_model", "model.n_heads", "training.batch_size", "data.objective"} <= set(err.value.paths)


def test_step_phases_are_checked_once_the_run_length_is_known():
    cfg = StackWiseConfig.from_dict(
        {**BASE, "schedule": [{"name": "a", "start_step": 0, "end_step": 30}, {"name": "b", "start_step": 30, "end_step": 90}]}
    )
    check_schedule(cfg, 90)
    with pytest.raises(ConfigError) as err:
        check_schedule(cfg, 100)
    assert "schedule.1.end_step" in err.value.paths


# ---------------------------------------------------------------------------------------------
# Fuzz: every malformed config raises ConfigError naming the offending key, never anything else.


def _with(path: str, value):
    """BASE with one dotted path set (a list index is a number)."""
    cfg = yaml.safe_load(yaml.safe_dump(BASE))
    node = cfg
    parts = path.split(".")
    for p in parts[:-1]:
        node = node.setdefault(p, {})
    node[parts[-1]] = value
    return cfg


def _phases(*spans, **extra):
    return [{"name": f"p{i}", "start_t": a, "end_t": b, **extra} for i, (a, b) in enumerate(spans)]


MALFORMED = [
    # wrong types
    (_with("model.d_model", "two hundred"), "model.d_model"),
    (_with("model.n_heads", [8]), "model.n_heads"),
    (_with("model.architecture", 3), "model.architecture"),
    (_with("model.architecture.n_stacks", "many"), "model.architecture.n_stacks"),
    (_with("model.tie_embeddings", "sometimes"), "model.tie_embeddings"),
    (_with("training.batch_size", 2.5), "training.batch_size"),
    (_with("training.optimizer.lr", "fast"), "training.optimizer.lr"),
    (_with("training.optimizer.betas", [0.9]), "training.optimizer.betas"),
    (_with("data.paths", "corpus.txt"), "data.paths"),
    (_with("data.use_dummy_data", {"yes": 1}), "data.use_dummy_data"),
    (_with("run.eval_every", "often"), "run.eval_every"),
    (_with("training", [1, 2]), "training"),
    # out of range
    (_with("model.d_model", 0), "model.d_model"),
    (_with("model.n_heads", -2), "model.n_heads"),
    (_with("model.dropout", 1.5), "model.dropout"),
    (_with("training.seq_len", 1), "training.seq_len"),
    (_with("training.optimizer.lr", -1e-3), "training.optimizer.lr"),
    (_with("training.optimizer.lr", 0.0), "training.optimizer.lr"),
    (_with("training.optimizer.betas", [0.9, 1.5]), "training.optimizer.betas"),
    (_with("training.optimizer.weight_decay", -0.1), "training.optimizer.weight_decay"),
    (_with("data.mask_rate", 0.0), "data.mask_rate"),
    (_with("data.mask_rate", {"start": 0.1, "end": 1.5}), "data.mask_rate.end"),
    (_with("data.mask_range", [0.9, 0.1]), "data.mask_range"),
    (_with("data.val_fraction", 0.9), "data.val_fraction"),
    (_with("run.keep_last", 0), "run.keep_last"),
    # bad choices and cross-field rules
    (_with("model.attention", "flash"), "model.attention"),
    (_with("data.objective", "gan"), "data.objective"),
    (_with("training.optimizer.optimizer_type", "Adagrad"), "training.optimizer.optimizer_type"),
    (_with("run.device", "tpu"), "run.device"),
    (_with("model.n_heads", 5), "model.n_heads"),  # 64 not divisible by 5
    ({**BASE, "model": {"d_model": 64, "n_heads": 4, "n_kv_heads": 3}}, "model.n_kv_heads"),
    ({**BASE, "model": {"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "attention": "mha"}}, "model.attention"),
    ({**BASE, "model": {"d_model": 64, "n_heads": 4, "max_seq_len": 64}, "training": {"seq_len": 128}}, "model.max_seq_len"),
    (_with("run.name", "../escape"), "run.name"),
    # unknown keys
    (_with("model.d_modle", 64), "model.d_modle"),
    (_with("training.optimizer.learning_rate", 1e-3), "training.optimizer.learning_rate"),
    (_with("data.tokeniser", "bpe"), "data.tokeniser"),
    ({**BASE, "extras": {}}, "extras"),
    ({**BASE, "schedule": [{"name": "a", "start_t": 0, "end_t": 1, "optimiser_config": {}}]}, "schedule.0.optimiser_config"),
    ({**BASE, "schedule": [{"name": "a", "start_t": 0, "end_t": 1, "model_config": {"grow": {"where": "middle"}}}]},
     "schedule.0.model_config.grow.where"),
    ({**BASE, "schedule": [{"name": "a", "start_t": 0, "end_t": 1, "model_config": {"trainable": "first:2"}}]},
     "schedule.0.model_config.trainable"),
    # phases: overlap, gap, not tiling, empty, malformed entries
    ({**BASE, "schedule": _phases((0.0, 0.6), (0.5, 1.0))}, "schedule.1.start_t"),
    ({**BASE, "schedule": _phases((0.0, 0.4), (0.5, 1.0))}, "schedule.1.start_t"),
    ({**BASE, "schedule": _phases((0.2, 1.0))}, "schedule.0.start_t"),
    ({**BASE, "schedule": _phases((0.0, 0.5))}, "schedule.0.end_t"),
    ({**BASE, "schedule": _phases((0.0, 0.5), (0.5, 0.5), (0.5, 1.0))}, "schedule.1.end_t"),
    ({**BASE, "schedule": _phases((0.0, 1.2))}, "schedule.0.end_t"),
    ({**BASE, "schedule": []}, "schedule"),
    ({**BASE, "schedule": {"name": "a"}}, "schedule"),
    ({**BASE, "schedule": [{"name": "a"}]}, "schedule.0.end_t"),
    ({**BASE, "schedule": [{"name": "a", "start_t": 0.0, "end_t": 1.0, "start_step": 0, "end_step": 9}]}, "schedule.0.start_t"),
    ({**BASE, "schedule": [{"name": "x", "start_t": 0, "end_t": 0.5}, {"name": "x", "start_t": 0.5, "end_t": 1}]},
     "schedule.1.name"),
    ({**BASE, "schedule": [{"start_t": 0, "end_t": 1}]}, "schedule.0.name"),
    ({**BASE, "schedule": [{"name": "a", "start_t": 0, "end_t": 1, "task": "gan"}]}, "schedule.0.task"),
    # missing sections, wrong top-level shape
    ({"model": {}, "training": {}}, "data"),
    ({"training": {}, "data": {}}, "model"),
    ({}, "model"),
    ([1, 2, 3], ""),
    ("just a string", ""),
]


@pytest.mark.parametrize(("config", "path"), MALFORMED, ids=[f"{i}-{p or 'root'}" for i, (_, p) in enumerate(MALFORMED)])
def test_malformed_config_names_the_key(config, path):
    with pytest.raises(ConfigError) as err:
        StackWiseConfig.from_dict(config)
    # The offending key, or an element inside it (e.g. `betas.1`), is named.
    assert any(p == path or (path and p.startswith(path + ".")) for p in err.value.paths), str(err.value)
    if path:
        assert path in str(err.value)


def test_fuzz_covers_at_least_forty_cases():
    assert len(MALFORMED) + len(BAD_FILES) >= 40


BAD_FILES = [
    ("empty.yaml", ""),
    ("list.yaml", "- 1\n- 2\n"),
    ("scalar.yaml", "42\n"),
    ("broken.yaml", "model: {d_model: 64\ntraining: ]\n"),
    ("tabs.yaml", "model:\n\t d_model: 64\n"),
    ("dup_unknown.yaml", "model: {}\ntraining: {}\ndata: {}\nrun: {colour: red}\n"),
]


@pytest.mark.parametrize(("name", "text"), BAD_FILES)
def test_malformed_yaml_file_is_a_config_error_naming_the_file(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        StackWiseConfig.from_yaml(path)
    assert name in str(err.value)


def test_missing_and_directory_paths(tmp_path):
    for bad in (tmp_path / "nope.yaml", tmp_path):
        with pytest.raises(ConfigError) as err:
            StackWiseConfig.from_yaml(bad)
        assert str(bad) in str(err.value)


def test_overrides_rederive_defaults(short_form_path):
    cfg = StackWiseConfig.from_yaml(short_form_path)
    assert cfg.model.ffn_hidden == 688
    bigger = cfg.with_overrides(["model.d_model=512", "model.n_heads=4"])
    assert bigger.model.ffn_hidden == 1376 and bigger.model.n_kv_heads == 4
