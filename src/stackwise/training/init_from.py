"""`model.init_from`: start a new run from existing weights (docs/interop.md).

The source is a local Hugging Face folder of a Llama-family causal LM, a stackwise run directory
(its newest good checkpoint) or one of its checkpoint folders. Two steps, both before training:

1. `resolve_init_from(config)`: the source fixes the model's shapes (d_model, heads, ffn, vocab,
   RoPE θ, norm ε, tying, biases) and, unless the config names another, the tokenizer. Its blocks
   become the rack: grouped by `model.architecture.blocks_per_stack` when given, else as the
   source grouped them (one stack of all layers for an HF model). A shape the config sets to
   another value is a conflict; all conflicts are listed in one ConfigError.
2. `load_initial_weights(config, model)`: the weights, dense (LoRA merged, NF4 dequantized), go
   into the freshly built model; `initial_optimizer_state` gives the optimizer state by the new
   run's parameter names when `model.init_from_optimizer` asks for it (matching shapes only).

A resumed run reads neither: its config.yaml is already resolved and its checkpoint holds the
weights, so the source may be gone by then.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stackwise.config import ConfigError, StackWiseConfig
from stackwise.data.tokenizer import load_tokenizer
from stackwise.interop import hf_import
from stackwise.interop.dense import dense_hf_state
from stackwise.model import StackWiseModel
from stackwise.model.lora import load_flat_state
from stackwise.training.checkpoint import (
    MODEL_FILE,
    Checkpoint,
    CheckpointError,
    CheckpointManager,
    load_checkpoint,
)
from stackwise.training.finite import nonfinite_tensors
from stackwise.training.optimizer import saved_state_by_name

FIELD = "model.init_from"

# ModelConfig fields a source fixes; the config may repeat them only with the same value.
_SHAPE_FIELDS = ("d_model", "n_heads", "n_kv_heads", "attention", "ffn_hidden", "rope_theta", "norm_eps",
                 "tie_embeddings", "qkv_bias")


@dataclass
class Source:
    """What `model.init_from` points at, read once."""

    path: Path
    kind: str  # "hf" | "run"
    settings: dict[str, Any]  # ModelConfig fields it fixes
    stack_sizes: list[int]  # blocks per stack, as the source groups them
    max_seq_len: int
    vocab_size: int
    tokenizer: Path | None
    tokenizer_kind: str = "bpe"
    hf: hf_import.HFModel | None = None
    checkpoint: Checkpoint | None = None
    run_config: StackWiseConfig | None = None


def find_source(raw: str) -> Source:
    path = Path(raw).expanduser()
    try:
        if hf_import.is_hf_folder(path):
            return _hf_source(path)
        if (path / "meta.json").is_file():
            return _run_source(path.parent.parent, load_checkpoint(path))
        if (path / "config.yaml").is_file() and (path / "checkpoints").is_dir():
            ckpt = CheckpointManager(path).latest_good()
            if ckpt is None:
                raise CheckpointError(f"{path}: the run has no usable checkpoint")
            return _run_source(path, ckpt)
    except (hf_import.HFImportError, CheckpointError) as err:
        raise ConfigError([(FIELD, str(err), raw)]) from None
    raise ConfigError([(FIELD, "is neither a Hugging Face model folder (config.json + model.safetensors), "
                               "a stackwise run directory nor one of its checkpoint folders", raw)])


def _hf_source(path: Path) -> Source:
    hf = hf_import.read_hf_folder(path)
    return Source(path=path, kind="hf", settings=hf_import.model_settings(hf), stack_sizes=[hf.n_layers],
                  max_seq_len=hf.max_position_embeddings if hf.sliding_window is None
                  else min(hf.max_position_embeddings, hf.sliding_window),
                  vocab_size=hf.vocab_size, tokenizer=hf.tokenizer_file, hf=hf)


def _run_source(run_dir: Path, ckpt: Checkpoint) -> Source:
    if ckpt.sharded:
        raise CheckpointError(f"{ckpt.path}: a sharded (torchrun) checkpoint; write it in the one-process format "
                              f"first with: stackwise consolidate {run_dir} --out NEW_RUN_DIR")
    try:
        config = StackWiseConfig.from_yaml(run_dir / "config.yaml")
    except ConfigError as err:
        raise CheckpointError(f"{run_dir / 'config.yaml'}: {err}") from None
    model = config.model
    settings = {name: getattr(model, name) for name in _SHAPE_FIELDS}
    settings["mla"] = model.mla.model_dump()
    rack = ckpt.meta.get("rack") or {}
    sizes = rack.get("blocks_per_stack")
    if not isinstance(sizes, list) or not sizes:
        raise CheckpointError(f"{ckpt.path}: meta.json does not describe the rack")
    vocab = int(ckpt.tensors["embedding.tokens.weight"].shape[0])
    tokenizer = run_dir / "tokenizer.json"
    return Source(path=ckpt.path, kind="run", settings=settings, stack_sizes=[int(n) for n in sizes],
                  max_seq_len=model.max_seq_len, vocab_size=vocab, tokenizer=tokenizer if tokenizer.is_file() else None,
                  tokenizer_kind=config.data.tokenizer.kind, checkpoint=ckpt, run_config=config)


# ---- 1. the config --------------------------------------------------------------------------


def resolve_init_from(config: StackWiseConfig, source: Source | None = None) -> StackWiseConfig:
    """The config with the source's shapes, rack grouping and tokenizer filled in (`source`:
    `find_source(config.model.init_from)` when the caller has read it already)."""
    if config.model.init_from is None:
        return config
    source = source or find_source(config.model.init_from)
    model, given = config.model, config.model.model_fields_set
    problems = [(f"model.{name}", f"the source {source.path} has {value!r}; remove the key or set it to that",
                 getattr(model, name))
                for name, value in source.settings.items()
                if name in given and name != "mla" and getattr(model, name) != value]
    if source.kind == "hf" and model.init_from_optimizer:
        problems.append(("model.init_from_optimizer", "a Hugging Face folder carries no optimizer state", True))
    sizes = _stack_sizes(config, source, problems)
    data = config.model_dump(mode="json", by_alias=True, exclude_unset=True)
    tokenizer_path = _tokenizer(config, source, data, problems)
    vocab = _vocab_size(config, source, tokenizer_path, problems)
    if problems:
        raise ConfigError(problems)
    max_seq_len = model.max_seq_len if "max_seq_len" in given else source.max_seq_len
    if source.hf is not None:
        try:
            hf_import.check_window(source.hf, max_seq_len)
        except hf_import.HFImportError as err:
            raise ConfigError([("model.max_seq_len", str(err), max_seq_len)]) from None
    section = data.setdefault("model", {})
    section.update({k: v for k, v in source.settings.items() if k != "mla" or source.settings["attention"] == "mla"})
    section["vocab_size"] = vocab
    section["max_seq_len"] = max_seq_len
    even = len(set(sizes)) == 1
    section["architecture"] = {"n_stacks": len(sizes), "blocks_per_stack": sizes[0] if even else sizes}
    return StackWiseConfig.from_dict(data, source=f"{FIELD}={config.model.init_from}")


def _stack_sizes(config: StackWiseConfig, source: Source, problems: list) -> list[int]:
    """The source's blocks regrouped by the config's `blocks_per_stack` when it gives one."""
    arch = config.model.architecture
    total = sum(source.stack_sizes)
    if "blocks_per_stack" not in arch.model_fields_set:
        if "n_stacks" in arch.model_fields_set and arch.n_stacks != len(source.stack_sizes):
            problems.append(("model.architecture.n_stacks", f"the source has {len(source.stack_sizes)} stacks "
                             f"({total} blocks); give blocks_per_stack to regroup them", arch.n_stacks))
        return source.stack_sizes
    given = arch.blocks_per_stack
    sizes = given if isinstance(given, list) else ([given] * (total // given) if total % given == 0 else [])
    if sum(sizes) != total:
        problems.append(("model.architecture.blocks_per_stack",
                         f"the source has {total} blocks, which this does not group exactly", given))
        return source.stack_sizes
    if "n_stacks" in arch.model_fields_set and arch.n_stacks != len(sizes):
        problems.append(("model.architecture.n_stacks", f"{total} blocks in stacks of {given} make {len(sizes)} stacks",
                         arch.n_stacks))
    return sizes


def _tokenizer(config: StackWiseConfig, source: Source, data: dict[str, Any], problems: list) -> Path | None:
    """The source's tokenizer unless the config names its own (then that one)."""
    if config.data.tokenizer.path is not None or config.data.use_dummy_data:
        return Path(config.data.tokenizer.path) if config.data.tokenizer.path else None
    if source.tokenizer is None:
        problems.append(("data.tokenizer.path", f"the source {source.path} has no tokenizer.json; name one", None))
        return None
    data.setdefault("data", {})["tokenizer"] = {**data.get("data", {}).get("tokenizer", {}),
                                                "kind": source.tokenizer_kind, "path": str(source.tokenizer)}
    return source.tokenizer


def _vocab_size(config: StackWiseConfig, source: Source, tokenizer: Path | None, problems: list) -> int:
    """Rows for every id of the source and of the tokenizer (which may have gained [PAD]/[MASK])."""
    needed = source.vocab_size
    if tokenizer is not None:
        try:
            needed = max(needed, load_tokenizer(tokenizer).vocab_size)
        except Exception as err:  # a DataError names the file; reported with the other problems
            problems.append(("data.tokenizer.path", str(err), str(tokenizer)))
    given = config.model.vocab_size if "vocab_size" in config.model.model_fields_set else None
    if given is not None and given < needed:
        problems.append(("model.vocab_size", f"the source and its tokenizer need {needed} rows", given))
    return max(needed, given or 0)


# ---- 2. the weights --------------------------------------------------------------------------


def load_initial_weights(config: StackWiseConfig, model: StackWiseModel, source: Source | None = None) -> Source:
    """Fill `model` (built from the resolved config) with the source's dense weights."""
    source = source or find_source(config.model.init_from)
    try:
        state = hf_import.load_hf_state(source.hf) if source.hf is not None else dense_hf_state(_source_model(source))
        bad = nonfinite_tensors(state.items())
        if bad:  # a run would only stop at its first step, blaming the learning rate
            raise hf_import.HFImportError(f"{source.path}: the weights hold NaN/Inf in {', '.join(bad[:5])}"
                                          f"{' ...' if len(bad) > 5 else ''}; they are damaged")
        hf_import.fill_model(model, state, tied=source.settings["tie_embeddings"], where=str(source.path))
    except hf_import.HFImportError as err:
        raise ConfigError([(FIELD, str(err), config.model.init_from)]) from None
    return source


def _source_model(source: Source) -> StackWiseModel:
    """The run's model at its checkpoint: structure replayed phase by phase, then its weights.
    Built under a forked RNG: the new run's random stream stays that of a run from scratch."""
    from stackwise.training.progressive import apply_model_phase, with_growth_schedule
    from stackwise.training.schedule import PhaseSchedule

    config = with_growth_schedule(source.run_config)
    ckpt = source.checkpoint
    # The run's own length: a checkpoint made before the run was extended replays the same phases.
    schedule = PhaseSchedule.from_config(config, config.training.total_steps or int(ckpt.meta["total_steps"]))
    if int(ckpt.state["phase_index"]) >= len(schedule.phases):  # a forged checkpoint (the schema checks the rest)
        raise ConfigError([(FIELD, f"{ckpt.path}: phase_index {ckpt.state['phase_index']} is beyond the run's "
                                   f"{len(schedule.phases)} phases", str(source.path))])
    with torch.random.fork_rng(devices=[]):
        model = StackWiseModel(config.model, vocab_size=source.vocab_size)
        for i in range(int(ckpt.state["phase_index"]) + 1):
            apply_model_phase(model, schedule.phases[i].model, i, config)
    try:
        load_flat_state(model, ckpt.tensors)
    except (KeyError, ValueError) as err:
        raise ConfigError([(FIELD, f"{ckpt.path / MODEL_FILE}: does not fit the run's curriculum ({err})",
                            str(source.path))]) from None
    return model


def initial_optimizer_state(config: StackWiseConfig, source: Source, model: StackWiseModel
                            ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """With `model.init_from_optimizer`: the source's optimizer state under the new run's names
    (blocks matched by position in the rack), for parameters whose shapes match; and the source
    names whose state was not brought."""
    if not config.model.init_from_optimizer or source.checkpoint is None:
        return {}, []
    saved = source.checkpoint.state
    if not saved.get("optimizer"):
        return {}, []
    by_old_name = saved_state_by_name(saved["optimizer"], saved["optimizer_names"])
    old_layers = _layer_of(source.checkpoint.meta["rack"])
    new_names = _names_by_layer(model)
    params = dict(model.named_parameters())
    out, dropped = {}, []
    for old, state in by_old_name.items():
        new = _rename(old, old_layers, new_names)
        param = params.get(new) if new else None
        shapes_fit = param is not None and all(
            v.shape == param.shape for v in state.values() if isinstance(v, torch.Tensor) and v.ndim)
        if shapes_fit:
            out[new] = state
        else:
            dropped.append(old)
    return out, dropped


def start_summary(config: StackWiseConfig, source: Source, model: StackWiseModel, tokenizer: Any,
                  brought: int, dropped: list[str]) -> dict[str, Any]:
    """What a run started from `source` says once, on the console and in metrics.jsonl."""
    sizes = [len(stack) for stack in model.rack]
    parts = [f"started from {source.path} ({'Hugging Face ' + source.hf.family if source.hf else 'a stackwise run'}): "
             f"{sum(sizes)} blocks in {len(sizes)} stack(s) {sizes}"]
    added = list(getattr(tokenizer, "added", []) or [])
    if added:
        parts.append(f"the tokenizer gained {', '.join(added)} as new ids")
    rows = model.vocab_size
    if rows > source.vocab_size:
        parts.append(f"the vocabulary grows from {source.vocab_size} to {rows} rows (new rows start as the mean row)")
    if config.model.init_from_optimizer:
        more = f": {', '.join(dropped[:8])}{' ...' if len(dropped) > 8 else ''}" if dropped else ""
        parts.append(f"optimizer state brought for {brought} parameters, not for {len(dropped)}{more}")
    return {"source": str(source.path), "blocks": sizes, "added_tokens": added, "vocab_rows": rows,
            "source_vocab_rows": source.vocab_size, "optimizer_brought": brought, "optimizer_not_brought": dropped,
            "message": "; ".join(parts)}


def _layer_of(rack: dict[str, Any]) -> dict[tuple[str, int], int]:
    """(stack id, block index) -> global layer, for the source rack described in meta.json."""
    layers, layer = {}, 0
    for stack_id, size in zip(rack["stack_ids"], rack["blocks_per_stack"], strict=True):
        for j in range(size):
            layers[(str(stack_id), j)] = layer
            layer += 1
    return layers


def _names_by_layer(model: StackWiseModel) -> list[str]:
    """Global layer -> 'rack.stacks.{id}.blocks.{j}.' of the new model."""
    return [f"rack.stacks.{sid}.blocks.{j}." for sid, stack in model.rack.stacks.items() for j in range(len(stack))]


def _rename(old: str, old_layers: dict[tuple[str, int], int], new_prefixes: list[str]) -> str | None:
    if not old.startswith("rack.stacks."):
        return old
    parts = old.split(".")
    layer = old_layers.get((parts[2], int(parts[4])))
    if layer is None or layer >= len(new_prefixes):
        return None
    return new_prefixes[layer] + ".".join(parts[5:])

