"""Write a run (or any StackWiseModel + Tokenizer) as a folder `transformers` loads as a Llama.

`AutoModelForCausalLM.from_pretrained(OUT)` and `AutoTokenizer.from_pretrained(OUT)` need no code
of ours: the folder holds `config.json` (LlamaForCausalLM), `generation_config.json`, the weights
(`model.safetensors`, or shards and `model.safetensors.index.json`) and the tokenizer files
(`tokenizer.json`, `tokenizer_config.json`, `special_tokens_map.json`). Nothing here imports
`transformers`. The weights are the dense form of `interop.dense`: LoRA merged, NF4 dequantized,
blocks in rack order as layers 0..L-1. See docs/interop.md.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from stackwise.interop.dense import dense_hf_state
from stackwise.interop.names import BLOCK_PARTS, HF_LAYER_PREFIX, OUTER

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
HF_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
BIDIRECTIONAL = ("mlm", "diffusion")
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_SIZE = "5GB"

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}

Warn = Callable[[str], None]


class ExportError(ValueError):
    """A model or run that cannot be exported as asked; the message names the problem and the fix."""


def _print_warning(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def parse_size(size: str | int) -> int:
    """Bytes in "5GB" (10^9), "200KB", "1.5MB", "2GiB" (2^30), or a plain count."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*", str(size), flags=re.I)
        unit = match.group(2).upper() if match else None
        if unit is not None and unit and not unit.endswith("B"):
            unit += "B"  # "5G" reads as 5GB
        if match is None or unit not in _UNITS:
            raise ExportError(f"max shard size {size!r} is not a size; use e.g. 5GB, 500MB, 200KB or a byte count")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value < 1:
        raise ExportError(f"max shard size must be positive, got {size!r}")
    return value


def _check_dtype(dtype: str) -> torch.dtype:
    if dtype not in DTYPES:
        raise ExportError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _reason(err: OSError) -> str:
    """An OSError as a short cause: "Permission denied: '/x/y'"."""
    if err.strerror and err.filename:
        return f"{err.strerror}: {str(err.filename)!r}"
    return err.strerror or str(err) or type(err).__name__


def _target(out: Path) -> Path:
    """The folder the export becomes: OUT itself, or the folder a symlink OUT points to."""
    return out.resolve() if out.is_symlink() else out


def _missing_parents(folder: Path) -> list[Path]:
    """`folder` and its ancestors that do not exist yet, outermost first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing[::-1]


def _check_out(out: Path) -> None:
    """Refuse an OUT the export cannot (or must not) become, before any expensive work: a file, a
    symlink to a non-folder, a non-empty folder, a parent that is a file, one we cannot write in."""
    try:
        if out.is_symlink() and not out.is_dir():
            what = "is not a folder" if out.exists() else "does not exist"
            raise ExportError(f"{out}: is a symlink to {os.readlink(out)}, which {what}; "
                              "choose a new folder for the export")
        if out.exists() and not out.is_dir():
            raise ExportError(f"{out}: exists and is not a folder; choose a new folder for the export")
        if out.is_dir() and any(out.iterdir()):
            raise ExportError(f"{out}: exists and is not empty; choose a new (or empty) folder for the export")
        missing = _missing_parents(_target(out).parent)
        parent = missing[0].parent if missing else _target(out).parent
        if not parent.is_dir():
            raise ExportError(f"{out}: {parent} is not a folder; choose another place for the export")
        # A real probe, not os.access: root passes access() on a read-only file system.
        try:
            os.rmdir(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".export-probe", dir=parent))
        except OSError as err:
            raise ExportError(f"{out}: cannot create a folder in {parent} ({err.strerror or err}); "
                              "choose a folder you can write to") from None
    except OSError as err:
        raise ExportError(f"{out}: cannot write the export there ({_reason(err)}); "
                          "choose a folder you can write to") from None


# ---- the model ----------------------------------------------------------------------------


def _blocks(model: nn.Module) -> list[nn.Module]:
    return [block for stack in model.rack for block in stack.blocks]


def _allowed_block_names() -> set[str]:
    names = set(BLOCK_PARTS)
    for part in BLOCK_PARTS:
        if part.endswith(".weight"):  # LoRA adapters merge into their base weight
            stem = part.removesuffix(".weight")
            names |= {f"{stem}.lora_A", f"{stem}.lora_B"}
    return names


def check_exportable(model: nn.Module) -> dict[str, Any]:
    """The Llama sizes of `model`, or ExportError when Llama cannot express it: MLA attention,
    blocks whose widths, head counts, biases or norm ε differ, parameters without a Llama name."""
    from stackwise.model.layers import LatentAttention

    blocks = _blocks(model)
    if getattr(model.cfg, "attention", None) == "mla" or any(isinstance(b.attention, LatentAttention) for b in blocks):
        raise ExportError(
            "the model uses mla attention (low-rank latent K/V with a decoupled RoPE key), which a Llama "
            "cannot express; only mha and gqa models export to Hugging Face Llama")
    if not blocks:
        raise ExportError("the model's rack has no blocks; nothing to export")
    allowed = _allowed_block_names()
    d_model = model.embedding.tokens.embedding_dim
    first = _block_shape(blocks[0])
    eps = {model.head.norm.eps}
    for layer, block in enumerate(blocks):
        shape = _block_shape(block)
        if shape != first:
            diff = ", ".join(f"{k} {first[k]} vs {shape[k]}" for k in first if first[k] != shape[k])
            raise ExportError(
                f"layer {layer} differs from layer 0 ({diff}): a Llama has one width and one head count "
                "for every layer, so stacks of different shapes cannot be exported")
        unknown = sorted(n for n, _ in block.named_parameters() if n not in allowed)
        if unknown:
            raise ExportError(f"layer {layer} has parameters with no Llama counterpart: {unknown}")
        eps |= {block.attn_norm.eps, block.mlp_norm.eps}
    if first["hidden"] != d_model:
        raise ExportError(f"the blocks are {first['hidden']} wide but the embedding is {d_model}")
    if len(eps) != 1:
        raise ExportError(f"the RMSNorms use different ε {sorted(eps)}; a Llama has one rms_norm_eps")
    rotary = model.rack.rotary
    if rotary.dim != first["head_dim"]:
        raise ExportError(f"RoPE covers {rotary.dim} channels of {first['head_dim']}; a Llama rotates whole heads")
    return {**first, "norm_eps": eps.pop(), "rope_theta": float(rotary.theta), "max_seq_len": int(rotary.max_seq_len)}


def _block_shape(block: nn.Module) -> dict[str, Any]:
    attn, mlp = block.attention, block.mlp
    return {
        "hidden": attn.q.in_features,
        "n_heads": attn.n_heads,
        "n_kv_heads": attn.n_kv_heads,
        "head_dim": attn.head_dim,
        "q": (attn.q.out_features, attn.q.in_features),
        "k": (attn.k.out_features, attn.k.in_features),
        "v": (attn.v.out_features, attn.v.in_features),
        "o": (attn.o.out_features, attn.o.in_features),
        "ffn": mlp.gate.out_features,
        "up": (mlp.up.out_features, mlp.up.in_features),
        "down": (mlp.down.out_features, mlp.down.in_features),
        "qkv_bias": (attn.q.bias is not None, attn.k.bias is not None, attn.v.bias is not None),
        "o_bias": attn.o.bias is not None,
    }


def hf_state(model: nn.Module, dtype: str = "fp32", sizes: dict[str, Any] | None = None) -> dict[str, torch.Tensor]:
    """HF Llama name -> contiguous CPU tensor in `dtype`, in file order (embedding, layers, norm,
    head). A tied head is written once, as the embedding. Llama's `attention_bias` puts a bias on
    o_proj as well as q/k/v, so a model with q/k/v biases gets a zero o_proj bias."""
    sizes = sizes or check_exportable(model)
    if sizes["qkv_bias"] not in ((True, True, True), (False, False, False)):
        raise ExportError(f"q/k/v biases {sizes['qkv_bias']}: Llama's attention_bias needs all three or none")
    if sizes["o_bias"]:
        raise ExportError("the o projection has a bias; stackwise models never do")
    target = _check_dtype(dtype)
    dense = dense_hf_state(model)
    n_layers = len(_blocks(model))
    order = [OUTER["embedding.tokens.weight"]]
    for layer in range(n_layers):
        layer_names = [f"{HF_LAYER_PREFIX}{layer}.{hf}" for hf in BLOCK_PARTS.values()]
        order += [n for n in layer_names if n in dense]
        if sizes["qkv_bias"][0]:
            name = f"{HF_LAYER_PREFIX}{layer}.self_attn.o_proj.bias"
            dense[name] = torch.zeros(sizes["hidden"], dtype=torch.float32)
            order.append(name)
    order.append(OUTER["head.norm.weight"])
    if not model.tied:
        order.append(OUTER["head.proj.weight"])
    missing = sorted(set(order) - set(dense))
    if missing or len(order) != len(dense):
        raise ExportError(f"internal: the dense state does not match the Llama layout (missing {missing})")
    return {name: dense[name].to(device="cpu", dtype=target).contiguous() for name in order}


def hf_config(model: nn.Module, tokenizer: Any = None, dtype: str = "fp32",
              sizes: dict[str, Any] | None = None) -> dict[str, Any]:
    """config.json of the LlamaForCausalLM that computes what `model` computes causally."""
    sizes = sizes or check_exportable(model)
    _check_dtype(dtype)
    theta = sizes["rope_theta"]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(model.vocab_size),
        "hidden_size": sizes["hidden"],
        "intermediate_size": sizes["ffn"],
        "num_hidden_layers": len(_blocks(model)),
        "num_attention_heads": sizes["n_heads"],
        "num_key_value_heads": sizes["n_kv_heads"],
        "head_dim": sizes["head_dim"],
        "hidden_act": "silu",
        "max_position_embeddings": sizes["max_seq_len"],
        "rms_norm_eps": sizes["norm_eps"],
        # transformers ≥ 5 reads rope_parameters; 4.x reads rope_theta (5.x folds it in silently).
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "rope_theta": theta,
        "attention_bias": bool(sizes["qkv_bias"][0]),
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": bool(model.tied),
        "initializer_range": float(getattr(model.cfg, "init_std", 0.02)),
        "pretraining_tp": 1,
        "use_cache": True,
        **_token_ids(tokenizer),
        "dtype": HF_DTYPE_NAMES[dtype],
        "torch_dtype": HF_DTYPE_NAMES[dtype],  # the name transformers 4.x reads
    }


def _token_ids(tokenizer: Any) -> dict[str, int | None]:
    if tokenizer is None:
        return {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    return {"bos_token_id": getattr(tokenizer, "bos_id", None), "eos_token_id": int(tokenizer.eos_id),
            "pad_token_id": int(tokenizer.pad_id)}


# ---- tokenizer files ----------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table: the one byte-level BPE (`tokenizers`' ByteLevel
    pre-tokenizer and decoder) uses."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {b: chr(b) for b in printable}, 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def byte_tokenizer_json(tokenizer: Any) -> str:
    """An HF `tokenizer.json` that encodes every text to the ids stackwise's ByteTokenizer gives
    (id b = byte b) and decodes them back: a merge-less BPE over the 256 byte-level characters,
    ByteLevel pre-tokenizer (no prefix space, no regex split) and decoder, and the specials."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    from stackwise.data.tokenizer import SPECIAL_TOKENS

    table = _bytes_to_unicode()
    if set(table.values()) != set(pre_tokenizers.ByteLevel.alphabet()):
        raise ExportError("internal: the byte-level alphabet of this `tokenizers` version is not GPT-2's")
    hf = HFTokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    specials = sorted(zip(tokenizer.special_ids, SPECIAL_TOKENS, strict=True))
    if [i for i, _ in specials] != list(range(256, 256 + len(specials))):
        raise ExportError(f"byte tokenizer specials at ids {[i for i, _ in specials]}, expected 256..258")
    hf.add_special_tokens([AddedToken(token, special=True, normalized=False) for _, token in specials])
    return hf.to_str(pretty=True)


def bpe_tokenizer_json(tokenizer: Any) -> str:
    """The run's own tokenizer.json, less any post-processor that adds tokens (a BOS, say):
    stackwise encodes without them, so AutoTokenizer must too."""
    body = json.loads(tokenizer.to_json())
    hf = tokenizer.hf
    probe = "a b"
    if body.get("post_processor") and hf.encode(probe, add_special_tokens=True).ids != hf.encode(
            probe, add_special_tokens=False).ids:
        body["post_processor"] = None
    return json.dumps(body, ensure_ascii=False, indent=2)


def _token_text(tokenizer: Any, token_id: int) -> str:
    if tokenizer.kind == "bpe":
        return tokenizer.hf.id_to_token(token_id)
    from stackwise.data.tokenizer import SPECIAL_TOKENS

    return dict(zip(tokenizer.special_ids, SPECIAL_TOKENS, strict=True))[token_id]


def tokenizer_files(tokenizer: Any, model_max_length: int) -> dict[str, str] | None:
    """File name -> text of the HF tokenizer files for `tokenizer`; None for the dummy tokenizer
    (random data has no text)."""
    kind = getattr(tokenizer, "kind", None)
    if kind == "byte":
        body = byte_tokenizer_json(tokenizer)
    elif kind == "bpe":
        body = bpe_tokenizer_json(tokenizer)
    else:
        return None
    specials = {
        "eos_token": _token_text(tokenizer, tokenizer.eos_id),
        "pad_token": _token_text(tokenizer, tokenizer.pad_id),
        "mask_token": _token_text(tokenizer, tokenizer.mask_id),
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": None,
        **specials,
        "model_max_length": model_max_length,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        # stackwise encodes "[EOS]" written in a text as text, never as the special id.
        "split_special_tokens": True,
    }
    return {
        "tokenizer.json": body,
        "tokenizer_config.json": json.dumps(config, indent=2, ensure_ascii=False),
        "special_tokens_map.json": json.dumps(specials, indent=2, ensure_ascii=False),
    }


# ---- writing ------------------------------------------------------------------------------


def _shards(tensors: dict[str, torch.Tensor], max_bytes: int) -> list[dict[str, torch.Tensor]]:
    """Tensors in order, cut into groups of at most `max_bytes` (a bigger tensor goes alone)."""
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = t
        size += nbytes
    return shards


def _write_weights(folder: Path, tensors: dict[str, torch.Tensor], max_bytes: int) -> list[str]:
    from safetensors.torch import save_file

    shards = _shards(tensors, max_bytes)
    if len(shards) == 1:
        save_file(tensors, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        return [WEIGHTS_FILE]
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map = {}
    for name, shard in zip(names, shards, strict=True):
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    return [*names, INDEX_FILE]


def _write_json(path: Path, body: dict[str, Any]) -> None:
    path.write_text(json.dumps(body, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_hf_folder(
    model: nn.Module,
    tokenizer: Any,
    out_dir: str | os.PathLike[str],
    *,
    dtype: str = "fp32",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    warn: Warn | None = None,
) -> Path:
    """Write `model` (a StackWiseModel) and `tokenizer` (a stackwise Tokenizer, or None) as a
    Hugging Face Llama folder `out_dir` (absent or empty). Everything goes into a temporary
    folder next to it, renamed into place at the end: a failure leaves no `out_dir`. Returns it."""
    warn = warn or _print_warning
    out = Path(out_dir)
    _check_dtype(dtype)
    max_bytes = parse_size(max_shard_size)
    _check_out(out)
    sizes = check_exportable(model)
    tensors = hf_state(model, dtype, sizes)
    config = hf_config(model, tokenizer, dtype, sizes)
    files = tokenizer_files(tokenizer, sizes["max_seq_len"]) if tokenizer is not None else None
    if files is None:
        warn("no tokenizer written: the run has no text tokenizer (dummy data); the weights still export, "
             "but AutoTokenizer cannot load this folder")
    target = _target(out)  # a symlink to an empty folder: the export replaces that folder
    umask = _umask()
    # What a plain mkdir / open would give (mkdtemp's folder is 0700), or an empty OUT's own mode.
    folder_mode = stat.S_IMODE(target.stat().st_mode) if target.is_dir() else 0o777 & ~umask
    file_mode = 0o666 & ~umask
    made: list[Path] = []
    tmp: Path | None = None
    removed = False
    try:
        for parent in _missing_parents(target.parent):
            parent.mkdir()
            made.append(parent)
        tmp = Path(_mkdtemp(target))
        _write_json(tmp / "config.json", config)
        generation = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if config[k] is not None}
        _write_json(tmp / "generation_config.json", {"_from_model_config": False, **generation})
        _write_weights(tmp, tensors, max_bytes)
        for name, text in (files or {}).items():
            (tmp / name).write_text(text, encoding="utf-8")
        for path in tmp.iterdir():
            path.chmod(file_mode)
        tmp.chmod(folder_mode)
        if target.is_dir():
            _check_out(out)  # still empty: replace it
            target.rmdir()
            removed = True
        os.replace(tmp, target)
    except BaseException as err:
        _undo(tmp, target if removed else None, folder_mode, made)
        if isinstance(err, OSError):
            raise ExportError(f"{out}: cannot write the export ({_reason(err)}); nothing was left there") from None
        raise
    return out


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _undo(tmp: Path | None, emptied: Path | None, mode: int, made: list[Path]) -> None:
    """After a failed write: remove the temporary folder, put back the empty OUT that was removed
    to make room, remove the parents the export created."""
    if tmp is not None:
        shutil.rmtree(tmp, ignore_errors=True)
    with contextlib.suppress(OSError):
        if emptied is not None and not emptied.exists():
            emptied.mkdir()
            emptied.chmod(mode)
    for parent in reversed(made):
        with contextlib.suppress(OSError):
            parent.rmdir()


def _mkdtemp(out: Path) -> str:
    return tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".export-tmp", dir=out.parent)


# ---- a run --------------------------------------------------------------------------------


def trained_objectives(machine: Any) -> list[str]:
    """The objective of every phase the checkpoint's model has been trained in, in order."""
    from stackwise.training.schedule import resolve_data

    last = max(machine.phase_index, 0)
    return [resolve_data(machine.config, phase)["objective"] for phase in machine.schedule.phases[: last + 1]]


def export_hf(
    run_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    checkpoint: str | os.PathLike[str] | None = None,
    dtype: str = "fp32",
    max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE,
    allow_bidirectional: bool = False,
    *,
    warn: Warn | None = None,
) -> Path:
    """Export a run's newest good checkpoint (or the `checkpoint` folder; one-process or sharded
    DCP) as a Hugging Face Llama folder `out_dir`; returns it. A model trained only with
    bidirectional objectives (mlm, diffusion) is refused unless `allow_bidirectional`: a Llama
    runs it causally."""
    from stackwise.training.checkpoint import CheckpointError
    from stackwise.training.machine import TrainingMachine

    warn = warn or _print_warning
    run, out = Path(run_dir), Path(out_dir)
    _check_dtype(dtype)
    parse_size(max_shard_size)
    _check_out(out)
    if not (run / "config.yaml").is_file():
        raise ExportError(f"{run}: not a run directory (no config.yaml); nothing to export")
    if checkpoint is None and not any((run / "checkpoints").glob("step_*")):
        raise ExportError(f"{run}: the run has no checkpoint; nothing to export")
    try:
        machine = TrainingMachine.for_evaluation(run, checkpoint=checkpoint)
    except CheckpointError as err:
        raise ExportError(f"cannot load a checkpoint to export: {err}") from None
    objectives = trained_objectives(machine)
    if all(o in BIDIRECTIONAL for o in objectives):
        trained = "/".join(dict.fromkeys(objectives))
        if not allow_bidirectional:
            raise ExportError(
                f"{run}: the model was trained only bidirectionally ({trained}); a Llama runs it with causal "
                "attention, which it never learned. Pass --allow-bidirectional (allow_bidirectional=True) to export anyway")
        warn(f"the model was trained only bidirectionally ({trained}); the exported Llama runs it causally")
    return write_hf_folder(machine.model, machine.data.tokenizer, out, dtype=dtype,
                           max_shard_size=max_shard_size, warn=warn)
