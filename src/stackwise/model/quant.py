"""NF4 (4-bit NormalFloat, QLoRA) storage for frozen weights: the only module that imports torchao.

torchao moved its NF4 code between releases (`torchao.dtypes.nf4tensor` → `torchao.quantization`),
so every use goes through this module, which tries the known paths once, on first use: importing
torchao costs over a second, which a run without NF4 (and every CLI start) should not pay.

Block sizes: values are quantized in blocks of 64, and the per-block scales are themselves
quantized to int8 in groups of `scaler_block_size`. torchao's default group of 256 needs the block
count to divide by 256, which the SwiGLU weights of d_model 256 / ffn 688 do not (2752 blocks), so
`to_nf4` picks the largest divisor of the block count that is ≤ 256 (172 there). Weights whose
size is not a multiple of 64 are refused (`nf4_supported` says so beforehand) rather than padded:
a padded weight would no longer have the shape `F.linear` expects.

Compute: `decode_nf4` turns the 4-bit codes back into the dense weight bit-identically to
torchao's decoder with a fraction of its temporaries, and `nf4_linear` decodes in forward and
again in backward, keeping only the 4-bit weight in between (QLoRA's memory saving).

Serialization: safetensors cannot hold the NF4Tensor subclass, so `nf4_to_tensors` spells one out
as its plain inner tensors plus an int64 metadata tensor, all under `<name>.__nf4__.`, and
`nf4_from_tensors` rebuilds it bit-exactly (no requantization).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F

NF4_BLOCK_SIZE = 64
MAX_SCALER_BLOCK_SIZE = 256
NF4_KEY = ".__nf4__."  # separates a weight's name from its inner tensor's name in flat state
_META = "meta"
_META_VERSION = 1
# The dtype a dequantized tensor takes by default, stored in the metadata by code.
_DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}
_CODE_DTYPES = {code: dtype for dtype, code in _DTYPE_CODES.items()}


def _import_torchao() -> tuple[type | None, Callable | None, str | None]:
    """(NF4Tensor, to_nf4, error). torchao logs harmless failures to load its CUDA-only kernels
    (and torch warns about its pytree registrations) at import: hide that."""
    noisy = [logging.getLogger(name) for name in ("torchao", "torch.utils._pytree")]
    levels = [log.level for log in noisy]
    for log in noisy:
        log.setLevel(logging.ERROR)
    try:
        try:
            from torchao.quantization import NF4Tensor, to_nf4
        except ImportError:
            from torchao.dtypes.nf4tensor import NF4Tensor, to_nf4
        return NF4Tensor, to_nf4, None
    except Exception as exc:  # any failure means "no NF4 here"; report it when NF4 is asked for
        return None, None, f"{type(exc).__name__}: {exc}"
    finally:
        for log, level in zip(noisy, levels, strict=True):
            log.setLevel(level)


@functools.cache
def _torchao() -> tuple[type | None, Callable | None, str | None]:
    return _import_torchao()


def _nf4_class() -> type:
    _require()
    return _torchao()[0]


def nf4_available() -> bool:
    """Whether torchao's NF4 tensor could be imported."""
    return _torchao()[0] is not None


def _require() -> None:
    if _torchao()[0] is None:
        raise RuntimeError(f"NF4 storage needs torchao (`pip install torchao`); importing it failed: {_torchao()[2]}")


def is_nf4(t: object) -> bool:
    # Until torchao is imported no tensor can be an NF4Tensor: answer without importing it.
    if "torchao" not in sys.modules or not isinstance(t, torch.Tensor):
        return False
    cls = _torchao()[0]
    return cls is not None and isinstance(t, cls)


def scaler_block_size_for(n_blocks: int) -> int:
    """Largest divisor of `n_blocks` that is ≤ 256: torchao needs the scale count to divide by it."""
    return max(d for d in range(1, min(n_blocks, MAX_SCALER_BLOCK_SIZE) + 1) if n_blocks % d == 0)


def nf4_supported(shape: torch.Size | tuple[int, ...]) -> bool:
    """Whether a weight of this shape can be stored in NF4 (1-D or 2-D, numel a multiple of 64)."""
    numel = 1
    for size in shape:
        numel *= size
    return 1 <= len(shape) <= 2 and numel > 0 and numel % NF4_BLOCK_SIZE == 0


def nf4_shardable(t: torch.Tensor, n_shards: int) -> bool:
    """Whether FSDP2 can split an NF4 weight into `n_shards` row shards: torchao splits its rows,
    4-bit codes, block scales and scale factors alike, so each must divide evenly."""
    names = ("quantized_data", "quantized_scalers", "quantization_factor")
    return t.size(0) % n_shards == 0 and all(getattr(t, n).numel() % n_shards == 0 for n in names)


def to_nf4(weight: torch.Tensor) -> torch.Tensor:
    """Quantize a dense 1-D/2-D floating weight to an NF4Tensor (blocks of 64, scales
    double-quantized in the largest group ≤ 256 that divides the block count)."""
    _require()
    if not nf4_supported(weight.shape):
        raise ValueError(
            f"cannot store a weight of shape {tuple(weight.shape)} in NF4: it needs 1 or 2 dimensions "
            f"and a number of elements divisible by {NF4_BLOCK_SIZE}"
        )
    if weight.dtype not in _DTYPE_CODES:
        raise ValueError(f"NF4 quantizes floating weights (fp32/bf16/fp16), got {weight.dtype}")
    n_blocks = weight.numel() // NF4_BLOCK_SIZE
    dense = weight.detach().contiguous()
    return _torchao()[1](dense, NF4_BLOCK_SIZE, scaler_block_size_for(n_blocks))


def dequantize(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A plain dense tensor: NF4 decoded (to `dtype`, default its original dtype), dense cast."""
    if is_nf4(t):
        return decode_nf4(t, dtype or t.dtype)
    return t.detach().to(dtype) if dtype is not None else t.detach()


def decode_nf4(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight an NF4 tensor stands for, bit-identical to torchao's `get_original_weight`.

    torchao decodes each half-byte through int64 indices and builds the two halves and their
    interleaving separately: about 5 temporaries the size of the weight per decode. Here one
    byte → (high, low) value-pair table gives both values of a byte in one lookup, written straight
    into the output, which is then scaled in place per block: one int32 index tensor is the only
    temporary. It runs in every forward and backward of a QLoRA layer, so the saving is paid back
    each step (2-3× faster on CPU, and fewer freed holes for the allocator to keep)."""
    scalers = t.dequantize_scalers(t.quantized_scalers, t.quantization_factor, t.scaler_block_size)
    # torchao multiplies code values (table dtype) by scales (weight dtype): the promoted dtype.
    compute = torch.promote_types(t.nf4.dtype, scalers.dtype)
    table = t.nf4.to(compute)
    pairs = torch.stack([table.repeat_interleave(16), table.repeat(16)], dim=1)  # byte b → (hi, lo)
    values = torch.empty(t.quantized_data.numel(), 2, dtype=compute, device=t.quantized_data.device)
    torch.index_select(pairs, 0, t.quantized_data.to(torch.int32), out=values)
    values.view(-1, t.block_size).mul_(scalers.to(compute).unsqueeze(1))
    return values.view(t.shape).to(dtype)


class _NF4Linear(torch.autograd.Function):
    """x @ Wᵀ for a frozen NF4 W: the 4-bit weight is what is kept for backward (decoded again
    there), never a dense copy per layer."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(weight)
        # Under autocast, decode straight into the autocast dtype: autocast would cast a decoded
        # fp32 weight anyway (same values), at the cost of a second weight-sized temporary.
        device = x.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype
        return F.linear(x, decode_nf4(weight, dtype))

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor) -> tuple[torch.Tensor, None]:
        (weight,) = ctx.saved_tensors
        return grad_out @ decode_nf4(weight, grad_out.dtype), None


def nf4_linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x @ weightᵀ for a frozen NF4 weight, computed in x's dtype; gradients reach x only."""
    return _NF4Linear.apply(x, weight)


def _inner_names(t: torch.Tensor) -> list[str]:
    names, _ = t.__tensor_flatten__()
    return list(names)


def nf4_nbytes(t: torch.Tensor) -> int:
    """True storage bytes of an NF4 tensor: packed 4-bit data, int8 block scales, the fp32 factors
    and mean of the double quantization, and its 16-entry code table."""
    if not is_nf4(t):
        raise TypeError(f"expected an NF4Tensor, got {type(t).__name__}")
    return sum(getattr(t, n).numel() * getattr(t, n).element_size() for n in _inner_names(t))


def nf4_clone(t: torch.Tensor) -> torch.Tensor:
    """An exact copy. torchao's own clone (hence deepcopy) requantizes from the decoded weight
    with default block sizes, which is lossy and fails for shapes like 688×256."""
    return _rebuild(t, {n: getattr(t, n).clone() for n in _inner_names(t)})


def _rebuild(like: torch.Tensor, inner: Mapping[str, torch.Tensor]) -> torch.Tensor:
    _, ctx = like.__tensor_flatten__()
    return _nf4_class().__tensor_unflatten__(dict(inner), ctx, like.shape, like.stride())


def _meta_tensor(t: torch.Tensor) -> torch.Tensor:
    # [version, block_size, n_blocks, scaler_block_size, dtype code, ndim, *shape]
    _, ctx = t.__tensor_flatten__()
    head = [_META_VERSION, ctx["block_size"], ctx["n_blocks"], ctx["scaler_block_size"]]
    return torch.tensor([*head, _DTYPE_CODES[t.dtype], t.dim(), *t.shape], dtype=torch.int64)


def nf4_to_tensors(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """The NF4 tensor `t` as plain contiguous CPU tensors `<name>.__nf4__.<inner>` plus
    `<name>.__nf4__.meta` (block sizes, dtype, shape): safetensors can store these."""
    if not is_nf4(t):
        raise TypeError(f"{name}: expected an NF4Tensor, got {type(t).__name__}")
    prefix = name + NF4_KEY
    # clone: inner tensors may share storage with the live weight, which safetensors refuses.
    out = {prefix + n: getattr(t, n).detach().cpu().contiguous().clone() for n in _inner_names(t)}
    out[prefix + _META] = _meta_tensor(t)
    return out


def nf4_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the NF4 weights spelled out in a flat tensor dict (in first-seen order)."""
    return list(dict.fromkeys(k.split(NF4_KEY)[0] for k in tensors if NF4_KEY in k))


def nf4_from_tensors(
    name: str, tensors: Mapping[str, torch.Tensor], device: torch.device | str | None = None
) -> torch.Tensor:
    """Rebuild the NF4 weight `name` written by `nf4_to_tensors`, bit-exactly."""
    _require()
    prefix = name + NF4_KEY
    if prefix + _META not in tensors:
        raise KeyError(f"no NF4 tensor named {name!r} (missing {prefix + _META})")
    meta = [int(v) for v in tensors[prefix + _META].tolist()]
    version, ndim = meta[0], meta[5]
    if version != _META_VERSION:
        raise ValueError(f"{name}: NF4 metadata version {version} is not supported (expected {_META_VERSION})")
    shape = torch.Size(meta[6 : 6 + ndim])
    inner = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix) and k != prefix + _META}
    if not inner:
        raise KeyError(f"{name}: NF4 metadata found but no inner tensors under {prefix!r}")
    if device is not None:
        inner = {k: v.to(device) for k, v in inner.items()}
    try:
        return _nf4_class().__tensor_unflatten__(inner, _context(shape, meta, inner), shape, _contiguous_stride(shape))
    except (KeyError, AssertionError) as exc:
        raise ValueError(f"{name}: NF4 inner tensors {sorted(inner)} do not rebuild an NF4Tensor: {exc}") from exc


def _contiguous_stride(shape: torch.Size) -> tuple[int, ...]:
    return torch.empty(shape, device="meta").stride()


def _context(shape: torch.Size, meta: list[int], inner: Mapping[str, torch.Tensor]) -> dict:
    """The flatten context NF4Tensor.__tensor_unflatten__ expects, from our stored metadata."""
    _, block_size, n_blocks, scaler_block_size, dtype_code = meta[:5]
    args_type = sys.modules[_nf4_class().__module__].SubclassTensorArgs
    device = next(iter(inner.values())).device
    tensor_meta = args_type(shape, _contiguous_stride(shape), 0, _CODE_DTYPES[dtype_code], device, False)
    return {
        "block_size": block_size,
        "n_blocks": n_blocks,
        "scaler_block_size": scaler_block_size,
        "tensor_meta": tensor_meta,
    }
