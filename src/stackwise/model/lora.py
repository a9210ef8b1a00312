"""LoRA adapters over frozen dense or NF4 bases (QLoRA), written in-house (no peft).

`attach_lora(module, targets, ...)` turns **every** `nn.Linear` of an adapted module (a stack, a
block) into a `LoRALinear` over its frozen weight: the ones whose attribute name is in `targets`
get rank-`rank` adapters, the others rank 0 (frozen base, no adapter). One layer type therefore
carries every storage precision (a bf16 or NF4 weight cannot sit in a plain `nn.Linear` that is
fed fp32 activations), and storage, merging and serialization treat all linears alike. Everything
else in the module (norms, embeddings) is frozen and left in its own dtype.

The base is registered as the parameter `weight` (requires_grad=False), so state-dict keys of the
base are those of the `nn.Linear` it replaced (`...q.weight`) and code reading `.weight` keeps
working; the adapters add `...q.lora_A` (rank × in) and `...q.lora_B` (out × rank).
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from stackwise.model import quant

logger = logging.getLogger(__name__)

PRECISIONS = ("fp32", "bf16", "fp16", "nf4")
_DENSE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _store(weight: torch.Tensor, precision: str) -> torch.Tensor:
    """The frozen base in its storage precision (a detached tensor, never the caller's Parameter)."""
    if precision == "nf4":
        # A shapes-only (meta) model, as `stackwise plan` builds, keeps a dense stand-in: the
        # memory planner counts it at NF4's size from `base_precision`.
        return weight.detach() if weight.is_meta else quant.to_nf4(weight)
    return weight.detach().to(_DENSE_DTYPES[precision])


class LoRALinear(nn.Module):
    """y = x·Wᵀ (+ b) + (alpha/rank) · B(A(dropout(x))) over a frozen base W (dense or NF4).

    A (rank × in) starts Kaiming-uniform and B (out × rank) at zero, so the output is the base's
    at attach. Compute runs in x's dtype whatever the storage precision. rank 0 means a frozen
    base without adapter.
    """

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        rank: int = 0,
        alpha: float = 1.0,
        dropout: float = 0.0,
        base_precision: str = "fp32",
    ):
        super().__init__()
        _check_settings(rank, alpha, dropout, base_precision)
        if weight.dim() != 2:
            raise ValueError(f"LoRALinear needs a 2-D weight, got shape {tuple(weight.shape)}")
        self.out_features, self.in_features = weight.shape
        self.rank, self.alpha, self.base_precision = rank, float(alpha), base_precision
        self.scale = self.alpha / rank if rank else 0.0
        self.weight = nn.Parameter(_store(weight, base_precision), requires_grad=False)
        frozen_bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.register_parameter("bias", frozen_bias)
        self._init_adapters(weight.device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def _init_adapters(self, device: torch.device) -> None:
        if not self.rank:
            self.register_parameter("lora_A", None)
            self.register_parameter("lora_B", None)
            return
        # Adapters train in fp32 whatever the base stores: their optimizer moments need it.
        self.lora_A = nn.Parameter(torch.empty(self.rank, self.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, self.rank, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's (and peft's) init

    def add_adapters(self, rank: int, alpha: float, dropout: float = 0.0) -> None:
        """Give an adapter-less layer (rank 0: a frozen base) rank-`rank` adapters; the base,
        NF4 or dense, stays exactly as it is."""
        if self.rank:
            raise ValueError("this layer already has adapters")
        _check_settings(rank, alpha, dropout, self.base_precision)
        self.rank, self.alpha = rank, float(alpha)
        self.scale = self.alpha / rank
        self._init_adapters(self.weight.device)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, rank: int = 0, alpha: float = 1.0, dropout: float = 0.0, base_precision: str = "fp32"
    ) -> LoRALinear:
        return cls(linear.weight, linear.bias, rank, alpha, dropout, base_precision)

    def _base_product(self, x: torch.Tensor) -> torch.Tensor:
        """x·Wᵀ over the frozen base, in x's dtype (no bias)."""
        if quant.is_nf4(self.weight):
            return quant.nf4_linear(x, self.weight)
        return F.linear(x, self.weight.to(x.dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._base_product(x)
        if self.rank:
            low = F.linear(self.dropout(x), self.lora_A.to(x.dtype))
            # out + scale·low·Bᵀ as one addmm: no output-sized update, scaled copy or sum in between.
            flat = torch.addmm(out.reshape(-1, self.out_features), low.reshape(-1, self.rank),
                               self.lora_B.to(out.dtype).t(), alpha=self.scale)
            out = flat.view(out.shape)
        return out if self.bias is None else out + self.bias.to(x.dtype)

    def merged_weight(self) -> torch.Tensor:
        """Dense fp32 W + scale·B·A (a new tensor, no grad)."""
        with torch.no_grad():
            dense = quant.dequantize(self.weight, torch.float32).clone()
            if self.rank:
                dense += self.scale * (self.lora_B.float() @ self.lora_A.float())
        return dense

    def to_linear(self) -> nn.Linear:
        """A plain frozen fp32 `nn.Linear` computing what this layer computes (in eval mode)."""
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(self.merged_weight(), requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().float().clone(), requires_grad=False)
        return linear

    def __deepcopy__(self, memo: dict) -> LoRALinear:
        # torchao's NF4 clone requantizes with default block sizes (lossy, and it fails for
        # 688×256), so copy NF4 bases through their inner tensors; everything else as usual.
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for key, value in self.__dict__.items():
            if key == "_parameters":
                value = {n: _copy_param(p, memo) for n, p in value.items()}
            else:
                value = copy.deepcopy(value, memo)
            new.__dict__[key] = value
        return new

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"alpha={self.alpha:g}, base_precision={self.base_precision}, bias={self.bias is not None}"
        )


def _copy_param(p: nn.Parameter | None, memo: dict) -> nn.Parameter | None:
    if p is None or not quant.is_nf4(p):
        return copy.deepcopy(p, memo)
    if id(p) not in memo:
        memo[id(p)] = nn.Parameter(quant.nf4_clone(p), requires_grad=False)
    return memo[id(p)]


def _check_settings(rank: int, alpha: float, dropout: float, precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"base_precision must be one of {PRECISIONS}, got {precision!r}")
    if rank < 0:
        raise ValueError(f"LoRA rank must be ≥ 0, got {rank}")
    if rank and alpha <= 0:
        raise ValueError(f"LoRA alpha must be > 0, got {alpha}")
    if not 0 <= dropout < 1:
        raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")


# ------------------------------------------------------------------------------------------
# attaching and merging


def _linears(module: nn.Module) -> list[tuple[str, nn.Linear]]:
    return [(path, m) for path, m in module.named_modules() if isinstance(m, nn.Linear)]


def lora_layers(module: nn.Module) -> list[tuple[str, LoRALinear]]:
    """(path, layer) of every LoRALinear in `module`, rank-0 (quantized-only) layers included."""
    return [(path, m) for path, m in module.named_modules() if isinstance(m, LoRALinear)]


def _replace(module: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, leaf = path.rpartition(".")
    setattr(module.get_submodule(parent_path), leaf, new)


def _check_untied(module: nn.Module, linears: list[tuple[str, nn.Linear]]) -> None:
    """Converting a tied weight would silently untie it (the head and the embedding, say)."""
    uses: dict[int, int] = {}
    for _, p in module.named_parameters(remove_duplicate=False):
        uses[id(p)] = uses.get(id(p), 0) + 1
    tied = [path for path, lin in linears if uses.get(id(lin.weight), 0) > 1]
    if tied:
        raise ValueError(f"cannot adapt tied weights {tied}: attach LoRA to stacks, not to the tied head")


def _storage_precision(path: str, weight: torch.Tensor, precision: str) -> str:
    """NF4 needs numel % 64 == 0; a (tiny) weight that is not keeps fp32 storage, with a warning."""
    if precision == "nf4" and not quant.nf4_supported(weight.shape):
        logger.warning("%s: shape %s cannot be stored in NF4; keeping it in fp32", path, tuple(weight.shape))
        return "fp32"
    return precision


def attach_lora(
    module: nn.Module,
    targets: list[str],
    rank: int,
    alpha: float,
    dropout: float = 0.0,
    base_precision: str = "fp32",
) -> list[str]:
    """Freeze `module` and turn every `nn.Linear` in it into a `LoRALinear` stored in
    `base_precision`; those whose attribute name is in `targets` (`q`, `k`, `v`, `o`, `gate`, `up`,
    `down`, MLA's `q_down`, `q_up`, `kv_down`, `k_up`, `v_up`, `k_rope`) get rank-`rank` adapters,
    the rest none. Returns the paths that got adapters. Target names absent from this module are
    ignored (MLA has no `k`), but targets that match nothing at all are an error (a typo)."""
    _check_settings(rank, alpha, dropout, base_precision)
    if rank < 1 and targets:
        raise ValueError(f"LoRA rank must be ≥ 1 to adapt {targets}, got {rank}")
    if isinstance(module, (nn.Linear, LoRALinear)):
        raise TypeError("attach_lora replaces linears inside a module: pass their parent (a block or stack)")
    if lora_layers(module):
        raise ValueError("module already carries LoRA layers; merge_lora it (or rebuild it) before attaching again")
    linears = _linears(module)
    _check_untied(module, linears)
    wanted = set(targets)
    adapted = [path for path, _ in linears if path.rpartition(".")[2] in wanted]
    if targets and not adapted:  # checked before anything changes
        names = sorted({path.rpartition(".")[2] for path, _ in linears})
        raise ValueError(f"LoRA targets {sorted(wanted)} match no Linear in this module; its Linears are {names}")
    module.requires_grad_(False)
    for path, linear in linears:
        r = rank if path in adapted else 0
        precision = _storage_precision(path, linear.weight, base_precision)
        _replace(module, path, LoRALinear.from_linear(linear, r, alpha, dropout, precision))
    return adapted


def add_adapters(module: nn.Module, targets: list[str], rank: int, alpha: float, dropout: float = 0.0) -> list[str]:
    """Adapters on the `targets` of a module whose linears are already adapter-less LoRALinear
    layers (a stack frozen in NF4), keeping their bases: re-quantizing them would lose more.
    Returns the paths that got adapters."""
    if rank < 1:
        raise ValueError(f"LoRA rank must be ≥ 1 to adapt {targets}, got {rank}")
    layers = lora_layers(module)
    adapted = [(path, layer) for path, layer in layers if path.rpartition(".")[2] in set(targets)]
    if not adapted:
        names = sorted({path.rpartition(".")[2] for path, _ in layers})
        raise ValueError(f"LoRA targets {sorted(targets)} match no layer in this module; its layers are {names}")
    for _, layer in adapted:
        layer.add_adapters(rank, alpha, dropout)
    return [path for path, _ in adapted]


def merge_lora(module: nn.Module) -> nn.Module:
    """A dense copy of `module` with every LoRALinear folded into a frozen fp32 `nn.Linear` of
    weight dequant(W) + scale·B·A; `module` itself is untouched. (Merging back into NF4 would
    requantize, which is lossy, so it is not offered.)"""
    # Seeding deepcopy's memo swaps each LoRALinear for its merged Linear as the copy is made,
    # so NF4 bases are never copied only to be thrown away.
    memo: dict = {id(layer): layer.to_linear() for _, layer in lora_layers(module)}
    return copy.deepcopy(module, memo)


def merge_lora_(module: nn.Module) -> nn.Module:
    """In place: replace every LoRALinear of `module` by its merged frozen fp32 `nn.Linear` (as
    `merge_lora` does on a copy) and return `module`. A LoRALinear passed itself cannot replace
    itself: its merged Linear is returned."""
    if isinstance(module, LoRALinear):
        return module.to_linear()
    for path, layer in lora_layers(module):
        _replace(module, path, layer.to_linear())
    return module


# ------------------------------------------------------------------------------------------
# parameters and storage


def lora_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The adapter parameters (lora_A, lora_B of every adapted LoRALinear), in module order."""
    return [p for _, layer in lora_layers(module) if layer.rank for p in (layer.lora_A, layer.lora_B)]


def count_lora_params(module: nn.Module) -> int:
    return sum(p.numel() for p in lora_parameters(module))


def tensor_nbytes(t: torch.Tensor) -> int:
    """Bytes a tensor really stores: NF4 through its inner tensors, dense numel × element size."""
    return quant.nf4_nbytes(t) if quant.is_nf4(t) else t.numel() * t.element_size()


def storage_bytes(module: nn.Module) -> int:
    """True storage of a module's parameters and buffers (shared tensors counted once)."""
    unique = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(tensor_nbytes(t) for t in unique.values())


# ------------------------------------------------------------------------------------------
# flat state (for safetensors, which cannot hold NF4Tensor)


def flat_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """`module.state_dict()` as plain contiguous CPU tensors: NF4 bases spelled out with
    `quant.nf4_to_tensors`, tensors sharing storage cloned (safetensors refuses shared ones)."""
    return flatten_state(module.state_dict())


def flatten_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A state dict in `flat_state`'s form (what `load_flat_state` takes)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, t in state.items():
        if quant.is_nf4(t):
            out.update(quant.nf4_to_tensors(name, t))
            continue
        dense = t.detach().cpu().contiguous()
        ptr = dense.untyped_storage().data_ptr()
        out[name] = dense.clone() if ptr in seen else dense
        seen.add(ptr)
    return out


def _check_flat(state: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Strict check of `tensors` against the module's state; returns the rebuilt NF4 tensors."""
    nf4_in_file = set(quant.nf4_names(tensors))
    in_file = {k for k in tensors if quant.NF4_KEY not in k} | nf4_in_file
    missing, unexpected = sorted(set(state) - in_file), sorted(in_file - set(state))
    if missing or unexpected:
        raise KeyError(f"flat state does not match the module: missing {missing}, unexpected {unexpected}")
    rebuilt, problems = {}, []
    for name, target in state.items():
        if quant.is_nf4(target) != (name in nf4_in_file):
            kinds = ("NF4", "dense") if quant.is_nf4(target) else ("dense", "NF4")
            problems.append(f"{name}: the module stores it {kinds[0]}, the file {kinds[1]}")
            continue
        source = quant.nf4_from_tensors(name, tensors, target.device) if name in nf4_in_file else tensors[name]
        if source.shape != target.shape or source.dtype != target.dtype:
            problems.append(f"{name}: file {tuple(source.shape)} {source.dtype}, module {tuple(target.shape)} {target.dtype}")
        elif name in nf4_in_file:
            rebuilt[name] = source
    if problems:
        raise ValueError("flat state does not match the module:\n  " + "\n  ".join(problems))
    return rebuilt


def load_flat_state(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Load `flat_state` output into a module of the same structure (call `attach_lora` with the
    same settings first). Strict: names, shapes, dtypes and NF4-ness must match; NF4 bases are
    rebuilt bit-exactly. Nothing is changed unless everything matches."""
    state = module.state_dict(keep_vars=True)
    rebuilt = _check_flat(state, tensors)
    with torch.no_grad():
        for name, target in state.items():
            if name in rebuilt:
                _swap(module, name, rebuilt[name])
            else:
                target.copy_(tensors[name])


def _swap(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace the whole tensor `name` (NF4 has no exact copy_)."""
    owner_path, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_path)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def nf4_state(module: nn.Module) -> dict[str, torch.Tensor]:
    """The NF4 weights of `module` alone, in `flat_state`'s form."""
    out: dict[str, torch.Tensor] = {}
    for name, t in module.state_dict().items():
        if quant.is_nf4(t):
            out.update(quant.nf4_to_tensors(name, t))
    return out


def load_nf4_state(module: nn.Module, tensors: Mapping[str, torch.Tensor]) -> None:
    """Put back `module`'s NF4 weights from `nf4_state` output, bit-exactly (the rest untouched)."""
    device = {name: t.device for name, t in module.state_dict().items()}
    for name in quant.nf4_names(tensors):
        _swap(module, name, quant.nf4_from_tensors(name, tensors, device[name]))
