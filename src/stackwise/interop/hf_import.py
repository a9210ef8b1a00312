"""Read a local Hugging Face Llama-family folder (Llama, Mistral, Qwen2) into stackwise's terms.

`read_hf_folder` checks `config.json` and says, in one error, everything stackwise cannot run
exactly (another architecture, activation, RoPE scaling, a sliding window that would bind, MLP
biases). `model_settings` turns the config into `ModelConfig` fields; `load_hf_state` reads the
safetensors weights (one file, or shards listed by `model.safetensors.index.json`) and
`fill_model` copies them into a StackWiseModel whose blocks, in rack order, are HF's layers.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from stackwise.interop.names import BLOCK_PARTS, HF_LAYER_PREFIX, OUTER, hf_block_name

FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class HFImportError(ValueError):
    """A Hugging Face folder stackwise cannot import; the message names the folder and the fix."""


@dataclass(frozen=True)
class HFModel:
    """What stackwise reads from an HF folder's config.json (already checked)."""

    path: Path
    family: str
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_hidden: int
    max_position_embeddings: int
    rope_theta: float
    norm_eps: float
    tied: bool
    qkv_bias: bool
    o_bias: bool  # Llama's attention_bias puts a bias on o_proj too: importable only when it is zero
    sliding_window: int | None
    eos_token_id: int | None

    @property
    def tokenizer_file(self) -> Path | None:
        path = self.path / "tokenizer.json"
        return path if path.is_file() else None


def is_hf_folder(path: Path) -> bool:
    return (path / "config.json").is_file() and ((path / WEIGHTS_FILE).is_file() or (path / INDEX_FILE).is_file())


def read_hf_folder(path: str | Path) -> HFModel:
    path = Path(path)
    cfg = _read_json(path / "config.json")
    if not isinstance(cfg, dict):
        raise HFImportError(f"{path / 'config.json'}: expected a JSON object")
    family = cfg.get("model_type")
    if family not in FAMILIES:
        raise HFImportError(
            f"{path}: model_type {_short(family)} is not a Llama-family causal LM; stackwise imports "
            f"{', '.join(sorted(FAMILIES))}")
    problems: list[str] = []
    read = _Reader(cfg, problems)
    d, heads = read.count("hidden_size"), read.count("num_attention_heads")
    kv = read.count("num_key_value_heads", default=heads)
    head_dim = read.count("head_dim", default=d // heads if d and heads else 0)
    if d and heads and head_dim and head_dim != d // heads:
        problems.append(f"head_dim={head_dim} differs from hidden_size/num_attention_heads={d // heads}")
    if cfg.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={_short(cfg.get('hidden_act'))}: stackwise's MLP is SwiGLU (silu)")
    if cfg.get("mlp_bias"):
        problems.append("mlp_bias=true: stackwise's MLP has no biases")
    theta, rope_type = _rope(cfg, read)
    if rope_type not in (None, "default"):
        problems.append(f"RoPE scaling {_short(rope_type)}: stackwise implements plain RoPE only")
    window = _sliding_window(cfg, family)
    model = HFModel(
        path=path, family=family, vocab_size=read.count("vocab_size"), d_model=d,
        n_layers=read.count("num_hidden_layers"), n_heads=heads, n_kv_heads=kv,
        ffn_hidden=read.count("intermediate_size"), max_position_embeddings=read.count("max_position_embeddings", 2048),
        rope_theta=theta, norm_eps=read.number("rms_norm_eps", 1e-6), tied=read.flag("tie_word_embeddings"),
        qkv_bias=family == "qwen2" or read.flag("attention_bias"),
        o_bias=family == "llama" and read.flag("attention_bias"), sliding_window=window,
        eos_token_id=_first_id(cfg.get("eos_token_id")),
    )
    if problems:
        raise HFImportError(f"{path}: cannot import this model:\n  " + "\n  ".join(problems))
    return model


def _read_json(path: Path) -> Any:
    """A JSON file that is a regular file and not absurdly nested; any problem is an HFImportError."""
    from stackwise.data.errors import DataError
    from stackwise.data.files import read_regular

    try:
        text = read_regular(path, "a model description").decode("utf-8")
        return json.loads(text)
    except DataError as err:
        raise HFImportError(str(err)) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HFImportError(f"{path}: cannot read it as JSON ({err})") from None
    except RecursionError:
        raise HFImportError(f"{path}: nested too deeply to be a model description") from None


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class _Reader:
    """Typed reads of config.json fields; each bad value becomes one line of the error."""

    def __init__(self, cfg: dict[str, Any], problems: list[str]):
        self.cfg, self.problems = cfg, problems

    def count(self, key: str, default: int | None = None) -> int:
        value = self.cfg.get(key)
        if value is None and default is not None:
            return default
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            self.problems.append(f"{key}={_short(value)}: expected a positive integer")
            return 0
        return value

    def number(self, key: str, default: float) -> float:
        value = self.cfg.get(key, default)
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
            self.problems.append(f"{key}={_short(value)}: expected a positive finite number")
            return default
        return float(value)

    def flag(self, key: str) -> bool:
        value = self.cfg.get(key, False)
        if not isinstance(value, bool) and value is not None:
            self.problems.append(f"{key}={_short(value)}: expected true or false")
            return False
        return bool(value)


def _rope(cfg: dict[str, Any], read: _Reader) -> tuple[float, str | None]:
    """RoPE θ and scaling type from either config format (transformers ≥ 5: rope_parameters)."""
    params, scaling = cfg.get("rope_parameters") or {}, cfg.get("rope_scaling") or {}
    if not isinstance(params, dict) or not isinstance(scaling, dict):
        read.problems.append("rope_parameters / rope_scaling: expected JSON objects")
        return 10000.0, None
    theta = _Reader({"rope_theta": params.get("rope_theta", cfg.get("rope_theta", 10000.0))}, read.problems)
    kind = params.get("rope_type") or scaling.get("rope_type") or scaling.get("type")
    return theta.number("rope_theta", 10000.0), kind


def _sliding_window(cfg: dict[str, Any], family: str) -> int | None:
    if family == "qwen2" and not cfg.get("use_sliding_window", False):
        return None
    window = cfg.get("sliding_window")
    return int(window) if isinstance(window, int) and window > 0 else None


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) else None


def model_settings(hf: HFModel) -> dict[str, Any]:
    """The ModelConfig fields an imported model fixes (architecture and max_seq_len excepted)."""
    return {
        "vocab_size": hf.vocab_size,
        "d_model": hf.d_model,
        "n_heads": hf.n_heads,
        "n_kv_heads": hf.n_kv_heads,
        "attention": "gqa" if hf.n_kv_heads < hf.n_heads else "mha",
        "ffn_hidden": hf.ffn_hidden,
        "rope_theta": hf.rope_theta,
        "norm_eps": hf.norm_eps,
        "tie_embeddings": hf.tied,
        "qkv_bias": hf.qkv_bias,
    }


def check_window(hf: HFModel, max_seq_len: int) -> None:
    """A sliding window shorter than the sequences stackwise will run changes attention: refused."""
    if hf.sliding_window is not None and hf.sliding_window < max_seq_len:
        raise HFImportError(
            f"{hf.path}: the model attends within a sliding window of {hf.sliding_window} positions, "
            f"and model.max_seq_len is {max_seq_len}; stackwise attends to the whole sequence, so set "
            f"model.max_seq_len to at most {hf.sliding_window} (attention is then identical)")


def load_hf_state(hf: HFModel) -> dict[str, torch.Tensor]:
    """Every tensor of the folder's safetensors file(s), by HF name. Shards must be regular files
    named inside the folder."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = [hf.path / WEIGHTS_FILE]
    if not files[0].is_file():
        files = [hf.path / name for name in _shard_names(hf.path / INDEX_FILE)]
    state: dict[str, torch.Tensor] = {}
    for file in files:
        if not file.is_file():  # a FIFO or device would hang the reader; a missing shard is named
            raise HFImportError(f"{file}: {'missing' if not file.exists() else 'not a regular file'}")
        try:
            state.update(load_file(str(file)))
        except (OSError, SafetensorError) as err:
            raise HFImportError(f"{file}: cannot read the weights ({err})") from None
    return state


def _shard_names(index: Path) -> list[str]:
    body = _read_json(index)
    weight_map = body.get("weight_map") if isinstance(body, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise HFImportError(f"{index}: not a safetensors index (no weight_map)")
    names = sorted({str(name) for name in weight_map.values()})
    outside = [n for n in names if Path(n).name != n or n in (".", "..")]
    if outside:
        raise HFImportError(f"{index}: lists files outside the model folder: {_short(outside)}")
    return names


def fill_model(model: torch.nn.Module, state: dict[str, torch.Tensor], tied: bool, where: str) -> None:
    """Copy weights under HF names into `model` (a dense StackWiseModel of the same shapes, blocks
    in rack order = HF layers). Vocabulary rows beyond the source's (tokens the tokenizer gained)
    start as the mean row. Every missing, unexpected or misshapen tensor is listed in one error."""
    targets = _targets(model, tied)
    problems = []
    for hf_name, param in targets.items():
        tensor = state.get(hf_name)
        rows = tensor.shape[0] if tensor is not None and hf_name in _VOCAB_ROWS else None
        if tensor is None:
            problems.append(f"missing {hf_name}")
        elif tuple(tensor.shape) != (tuple(param.shape) if rows is None else (min(rows, param.shape[0]), *param.shape[1:])):
            problems.append(f"{hf_name}: shape {tuple(tensor.shape)}, the model needs {tuple(param.shape)}")
    problems += [f"unexpected {name}" for name in sorted(set(state) - set(targets) - _ignorable(state, tied, where))]
    if problems:
        raise HFImportError(f"{where}: the weights do not match the model's shapes:\n  " + "\n  ".join(problems[:20]))
    with torch.no_grad():
        for hf_name, param in targets.items():
            tensor = state[hf_name]
            param[: tensor.shape[0]].copy_(tensor.to(param.dtype))
            if hf_name in _VOCAB_ROWS and tensor.shape[0] < param.shape[0]:
                param[tensor.shape[0]:] = tensor.float().mean(0).to(param.dtype)


_VOCAB_ROWS = {OUTER["embedding.tokens.weight"], OUTER["head.proj.weight"]}


def _targets(model: torch.nn.Module, tied: bool) -> dict[str, torch.Tensor]:
    """HF name -> the parameter of `model` it fills."""
    params = dict(model.named_parameters())
    targets = {OUTER["embedding.tokens.weight"]: params["embedding.tokens.weight"],
               OUTER["head.norm.weight"]: params["head.norm.weight"]}
    if not tied:
        targets[OUTER["head.proj.weight"]] = params["head.proj.weight"]
    layer = 0
    for stack_id, stack in model.rack.stacks.items():
        for j in range(len(stack.blocks)):
            prefix = f"rack.stacks.{stack_id}.blocks.{j}."
            for part in BLOCK_PARTS:
                if prefix + part in params:
                    targets[hf_block_name(layer, part)] = params[prefix + part]
            layer += 1
    return targets


def _ignorable(state: dict[str, torch.Tensor], tied: bool, where: str) -> set[str]:
    """Tensors HF folders may carry that stackwise does not need: RoPE tables, a tied head's copy,
    Llama's o_proj bias when it is all zeros (stackwise's own exports write it so)."""
    names = {n for n in state if n.endswith("rotary_emb.inv_freq")}
    if tied:
        names.add(OUTER["head.proj.weight"])
    for name in state:
        if name.startswith(HF_LAYER_PREFIX) and name.endswith("self_attn.o_proj.bias"):
            if not bool(state[name].eq(0).all()):
                raise HFImportError(f"{where}: {name} is not zero; stackwise's attention output has no bias")
            names.add(name)
    return names
