"""Specs: plain dataclasses that describe each plane, so components can be checked against each
other before a step is taken. Every spec has `to_dict()`, `from_dict()` (exact round trip, also
through JSON) and `validate()`, which raises `SpecError` naming the field and the bad value.

Public through `stackwise.framework`; this module imports nothing of the model or training code
so that both can depend on it.
"""

from __future__ import annotations

import dataclasses
import math
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar

OBJECTIVES = ("clm", "mlm", "diffusion")
ATTENTION_MODES = ("causal", "bidirectional")
ATTENTION_KINDS = ("mha", "gqa", "mla")
ROLES = ("trainable", "frozen", "adapted")
PRECISIONS = ("fp32", "bf16", "fp16", "nf4")
OPTIMIZERS = ("AdamW", "Adam", "SGD")


def objective_attention_mode(objective: str) -> str:
    """The attention mode an objective needs: next-token prediction must not look ahead."""
    return "causal" if objective == "clm" else "bidirectional"


# Where a spec field's value comes from in a run's config: a SpecError that reaches a user who
# wrote a config names the config key first, in the user's words ("training.optimizer.lr
# (OptimizerSpec.lr): ..."). A phase may override most of these (its optimizer_config /
# data_config), hence "or the phase's".
_PHASE_OPT = "or the phase's optimizer_config."
_PHASE_DATA = "or the phase's data_config."
CONFIG_PATHS = {
    **{f"OptimizerSpec.{k}": f"training.optimizer.{k} {_PHASE_OPT}{k}"
       for k in ("optimizer_type", "lr", "weight_decay", "betas", "momentum", "grad_clip")},
    "OptimizerSpec.eps": "training.optimizer.eps",
    "OptimizerSpec.param_names": "schedule's model_config.trainable",
    **{f"{spec}.{k}": f"training.{k} {_PHASE_DATA}{k}" for spec in ("BatchSpec", "DataSpec") for k in ("batch_size", "seq_len")},
    **{f"{spec}.{k}": f"data.{k} {_PHASE_DATA}{k}"
       for spec in ("BatchSpec", "DataSpec") for k in ("objective", "mask_rate", "mask_range")},
    "BatchSpec.vocab_size": "data.tokenizer.vocab_size",
    "DataSpec.vocab_size": "data.tokenizer.vocab_size",
    "DataSpec.tokenizer": "data.tokenizer.kind",
    "DataSpec.corpus": "data.paths",
    "DataSpec.val_fraction": "data.val_fraction",
    "DataSpec.seed": "training.seed",
    "data.vocab_size": "model.vocab_size",
    "data.seq_len": "training.seq_len (vs model.max_seq_len)",
    "EmbeddingSpec.vocab_size": "model.vocab_size",
    "HeadSpec.vocab_size": "model.vocab_size",
    **{f"{spec}.d_model": "model.d_model" for spec in ("EmbeddingSpec", "HeadSpec", "RackSpec")},
    **{f"RackSpec.{k}": f"model.{k}" for k in ("n_heads", "n_kv_heads", "attention", "ffn_hidden", "max_seq_len")},
    "RackSpec.n_stacks": "model.architecture.n_stacks",
    "RackSpec.blocks_per_stack": "model.architecture.blocks_per_stack",
    "optimizer.param_names": "schedule's model_config.trainable",
}


def _in_config_terms(field: str) -> str:
    """`field`, preceded by the config key it comes from when there is one."""
    key = field.split("[")[0]
    for prefix in ("ModelSpec.",):  # ModelSpec reports its parts as ModelSpec.RackSpec.d_model
        key = key.removeprefix(prefix)
    path = CONFIG_PATHS.get(key)
    return f"{path} ({field})" if path else field


class SpecError(ValueError):
    """One or more specs are invalid or do not fit together. `problems` lists (field, message);
    the text names, for fields a config sets, the config key first (CONFIG_PATHS)."""

    def __init__(self, problems: list[tuple[str, str]]):
        self.problems = problems
        if len(problems) == 1:
            text = f"{_in_config_terms(problems[0][0])}: {problems[0][1]}"
        else:
            text = f"{len(problems)} problems:\n" + "\n".join(f"  {_in_config_terms(f)}: {m}" for f, m in problems)
        super().__init__(text)


class _Spec:
    """Shared to_dict / from_dict / validate for the spec dataclasses."""

    _name: ClassVar[str] = "spec"

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            value = getattr(self, f.name)
            out[f.name] = value.to_dict() if isinstance(value, _Spec) else _plain(value)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Any:
        if not isinstance(data, dict):
            raise SpecError([(cls._name, f"expected a mapping, got {type(data).__name__}")])
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        problems = [(f"{cls._name}.{k}", "unknown field") for k in data if k not in names]
        required = [f.name for f in dataclasses.fields(cls) if _is_required(f)]  # type: ignore[arg-type]
        problems += [(f"{cls._name}.{k}", "is missing") for k in required if k not in data]
        if problems:
            raise SpecError(problems)
        hints = typing.get_type_hints(cls)
        return cls(**{k: _restore(hints[k], v) for k, v in data.items()})

    def validate(self) -> None:
        problems = [(f"{self._name}.{f}", m) for f, m in self._problems()]
        if problems:
            raise SpecError(problems)

    def _problems(self) -> list[tuple[str, str]]:
        raise NotImplementedError


def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _plain(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def _restore(hint: Any, value: Any) -> Any:
    """Turn JSON-shaped values back into the field's type (lists → tuples, nested specs)."""
    if isinstance(hint, type) and issubclass(hint, _Spec):
        return hint.from_dict(value)
    origin = typing.get_origin(hint)
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        for arg in typing.get_args(hint):
            if typing.get_origin(arg) is tuple and isinstance(value, list):
                return tuple(value)
    return value


def _positive(problems: list, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        problems.append((name, f"must be a positive integer, got {value!r}"))


def _choice(problems: list, name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        problems.append((name, f"must be one of {list(choices)}, got {value!r}"))


def _unit_rate(problems: list, name: str, value: Any) -> None:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 < value <= 1:
        problems.append((name, f"must be a rate in (0, 1], got {value!r}"))


# --------------------------------------------------------------------------------------------


@dataclass
class BatchSpec(_Spec):
    """The shape and meaning of the batches a data loader yields."""

    _name: ClassVar[str] = "BatchSpec"
    batch_size: int
    seq_len: int
    vocab_size: int
    objective: str = "clm"
    attention_mode: str = "causal"
    mask_rate: float | None = None

    def _problems(self) -> list[tuple[str, str]]:
        p: list[tuple[str, str]] = []
        _positive(p, "batch_size", self.batch_size)
        _positive(p, "seq_len", self.seq_len)
        _positive(p, "vocab_size", self.vocab_size)
        _choice(p, "objective", self.objective, OBJECTIVES)
        _choice(p, "attention_mode", self.attention_mode, ATTENTION_MODES)
        if self.objective in OBJECTIVES and self.attention_mode in ATTENTION_MODES:
            need = objective_attention_mode(self.objective)
            if self.attention_mode != need:
                p.append(("attention_mode", f"objective {self.objective!r} needs {need!r}, got {self.attention_mode!r}"))
        if self.mask_rate is not None:
            _unit_rate(p, "mask_rate", self.mask_rate)
        if self.objective == "mlm" and self.mask_rate is None:
            p.append(("mask_rate", "objective 'mlm' needs a mask rate"))
        return p


@dataclass
class DataSpec(_Spec):
    """What the data plane is configured to produce in a phase."""

    _name: ClassVar[str] = "DataSpec"
    corpus: str
    tokenizer: str
    vocab_size: int
    seq_len: int
    batch_size: int
    objective: str = "clm"
    mask_rate: float | None = None
    mask_range: tuple[float, float] | None = None
    val_fraction: float = 0.05
    seed: int = 0

    @property
    def attention_mode(self) -> str:
        return objective_attention_mode(self.objective)

    def batch_spec(self) -> BatchSpec:
        return BatchSpec(self.batch_size, self.seq_len, self.vocab_size, self.objective, self.attention_mode, self.mask_rate)

    def _problems(self) -> list[tuple[str, str]]:
        p: list[tuple[str, str]] = []
        if not isinstance(self.corpus, str) or not self.corpus:
            p.append(("corpus", f"must name the corpus, got {self.corpus!r}"))
        _choice(p, "tokenizer", self.tokenizer, ("byte", "bpe", "dummy"))
        _positive(p, "vocab_size", self.vocab_size)
        _positive(p, "seq_len", self.seq_len)
        _positive(p, "batch_size", self.batch_size)
        _choice(p, "objective", self.objective, OBJECTIVES)
        if self.mask_rate is not None:
            _unit_rate(p, "mask_rate", self.mask_rate)
        if self.mask_range is not None:
            lo, hi = self.mask_range if len(self.mask_range) == 2 else (None, None)
            if lo is None or not 0 < lo <= hi <= 1:
                p.append(("mask_range", f"needs 0 < lo <= hi <= 1, got {self.mask_range!r}"))
        if not isinstance(self.val_fraction, (int, float)) or not 0 < self.val_fraction <= 0.5:
            p.append(("val_fraction", f"must lie in (0, 0.5], got {self.val_fraction!r}"))
        if not isinstance(self.seed, int):
            p.append(("seed", f"must be an integer, got {self.seed!r}"))
        return p


@dataclass
class EmbeddingSpec(_Spec):
    _name: ClassVar[str] = "EmbeddingSpec"
    vocab_size: int
    d_model: int
    tied: bool = True
    frozen: bool = False

    def _problems(self) -> list[tuple[str, str]]:
        p: list[tuple[str, str]] = []
        _positive(p, "vocab_size", self.vocab_size)
        _positive(p, "d_model", self.d_model)
        return p


@dataclass
class RackSpec(_Spec):
    """The rack's structure: stacks, blocks per stack, widths, and each stack's role and precision."""

    _name: ClassVar[str] = "RackSpec"
    n_stacks: int
    blocks_per_stack: list[int]
    d_model: int
    n_heads: int
    n_kv_heads: int
    attention: str = "mha"
    ffn_hidden: int = 0
    max_seq_len: int = 1024
    roles: list[str] = field(default_factory=list)
    precisions: list[str] = field(default_factory=list)
    stack_ids: list[str] = field(default_factory=list)  # creation ids, in rack order (parameter names use them)

    @property
    def n_blocks(self) -> int:
        return sum(self.blocks_per_stack)

    @property
    def frozen_stacks(self) -> list[int]:
        return [i for i, r in enumerate(self.roles) if r == "frozen"]

    @property
    def adapted_stacks(self) -> list[int]:
        return [i for i, r in enumerate(self.roles) if r == "adapted"]

    @property
    def trainable_stacks(self) -> list[int]:
        return [i for i, r in enumerate(self.roles) if r == "trainable"]

    def _problems(self) -> list[tuple[str, str]]:
        p: list[tuple[str, str]] = []
        _positive(p, "n_stacks", self.n_stacks)
        for name in ("d_model", "n_heads", "n_kv_heads", "ffn_hidden", "max_seq_len"):
            _positive(p, name, getattr(self, name))
        _choice(p, "attention", self.attention, ATTENTION_KINDS)
        for name in ("blocks_per_stack", "roles", "precisions"):
            value = getattr(self, name)
            if not isinstance(value, list) or len(value) != self.n_stacks:
                p.append((name, f"needs one entry per stack (n_stacks={self.n_stacks}), got {value!r}"))
        if self.stack_ids and (not isinstance(self.stack_ids, list) or len(self.stack_ids) != self.n_stacks
                               or len(set(self.stack_ids)) != len(self.stack_ids)):
            p.append(("stack_ids", f"needs one distinct id per stack (n_stacks={self.n_stacks}), got {self.stack_ids!r}"))
        if isinstance(self.blocks_per_stack, list):
            for i, n in enumerate(self.blocks_per_stack):
                _positive(p, f"blocks_per_stack[{i}]", n)
        for i, role in enumerate(self.roles if isinstance(self.roles, list) else []):
            _choice(p, f"roles[{i}]", role, ROLES)
        for i, prec in enumerate(self.precisions if isinstance(self.precisions, list) else []):
            _choice(p, f"precisions[{i}]", prec, PRECISIONS)
        if all(isinstance(getattr(self, n), int) and getattr(self, n) > 0 for n in ("d_model", "n_heads", "n_kv_heads")):
            if self.d_model % self.n_heads:
                p.append(("n_heads", f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}"))
            if self.n_heads % self.n_kv_heads:
                p.append(("n_kv_heads", f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}"))
        return p


@dataclass
class HeadSpec(_Spec):
    _name: ClassVar[str] = "HeadSpec"
    d_model: int
    vocab_size: int
    tied: bool = True
    frozen: bool = False

    def _problems(self) -> list[tuple[str, str]]:
        p: list[tuple[str, str]] = []
        _positive(p, "d_model", self.d_model)
        _positive(p, "vocab_size", self.vocab_size)
        return p


@dataclass
class ModelSpec(_Spec):
    """The whole model: its three parts and the names of the parameters that train."""

    _name: ClassVar[str] = "ModelSpec"
    embedding: EmbeddingSpec
    rack: RackSpec
    head: HeadSpec
    trainable_parameters: list[str] = field(default_factory=list)

    def _problems(self) -> list[tuple[str, str]]:
        p: list[tuple[str, str]] = []
        for part in (self.embedding, self.rack, self.head):
            p += [(f"{part._name}.{f}", m) for f, m in part._problems()]
        return p


@dataclass
class OptimizerSpec(_Spec):
    """An optimizer: its type, hyperparameters and the parameters (by name) it updates."""

    _name: ClassVar[str] = "OptimizerSpec"
    optimizer_type: str = "AdamW"
    lr: float = 3e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    momentum: float = 0.0
    grad_clip: float | None = None
    param_names: list[str] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)

    def _problems(self) -> list[tuple[str, str]]:
        p: list[tuple[str, str]] = []
        _choice(p, "optimizer_type", self.optimizer_type, OPTIMIZERS)
        if not _finite_number(self.lr) or self.lr <= 0:
            p.append(("lr", f"must be a positive number, got {self.lr!r}"))
        if not _finite_number(self.weight_decay) or self.weight_decay < 0:
            p.append(("weight_decay", f"must be >= 0, got {self.weight_decay!r}"))
        if not (isinstance(self.betas, tuple) and len(self.betas) == 2 and all(_finite_number(b) and 0 <= b < 1 for b in self.betas)):
            p.append(("betas", f"must be two numbers in [0, 1), got {self.betas!r}"))
        if not _finite_number(self.eps) or self.eps <= 0:
            p.append(("eps", f"must be > 0, got {self.eps!r}"))
        if not _finite_number(self.momentum) or not 0 <= self.momentum < 1:
            p.append(("momentum", f"must lie in [0, 1), got {self.momentum!r}"))
        if self.grad_clip is not None and (not _finite_number(self.grad_clip) or self.grad_clip <= 0):
            p.append(("grad_clip", f"must be > 0 or None, got {self.grad_clip!r}"))
        if len(set(self.param_names)) != len(self.param_names):
            dupes = sorted({n for n in self.param_names if self.param_names.count(n) > 1})
            p.append(("param_names", f"lists parameters twice: {dupes}"))
        grouped = [n for names in self.groups.values() for n in names]
        if self.groups and sorted(grouped) != sorted(self.param_names):
            p.append(("groups", "parameter groups must partition param_names exactly"))
        return p


def _finite_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


# --------------------------------------------------------------------------------------------


def validate_training_state(data: BatchSpec | DataSpec, model: ModelSpec, optimizer: OptimizerSpec) -> None:
    """Check that the three planes fit each other; raise SpecError listing every mismatch.

    Objects that offer `get_batch_spec()` / `to_spec()` are accepted in place of their specs.
    """
    data, model, optimizer = _as_spec(data), _as_spec(model), _as_spec(optimizer)
    problems: list[tuple[str, str]] = []
    for spec in (data, model, optimizer):
        problems += [(f"{spec._name}.{f}", m) for f, m in spec._problems()]
    batch = data.batch_spec() if isinstance(data, DataSpec) else data
    emb, rack, head = model.embedding, model.rack, model.head
    if batch.vocab_size > emb.vocab_size:
        problems.append(("data.vocab_size", f"{batch.vocab_size} token ids do not fit the model's embedding of {emb.vocab_size}"))
    if head.vocab_size != emb.vocab_size:
        problems.append(("head.vocab_size", f"{head.vocab_size} differs from the embedding's {emb.vocab_size}"))
    if not emb.d_model == rack.d_model == head.d_model:
        problems.append(("rack.d_model", f"embedding {emb.d_model}, rack {rack.d_model} and head {head.d_model} must agree"))
    if batch.seq_len > rack.max_seq_len:
        problems.append(("data.seq_len", f"{batch.seq_len} exceeds the model's positions (max_seq_len={rack.max_seq_len})"))
    need = objective_attention_mode(batch.objective) if batch.objective in OBJECTIVES else None
    if need and batch.attention_mode != need:
        problems.append(("data.attention_mode", f"objective {batch.objective!r} needs {need!r}, got {batch.attention_mode!r}"))
    trainable, covered = set(model.trainable_parameters), set(optimizer.param_names)
    if not trainable:
        problems.append(("model", "has no trainable parameters"))
    if missing := sorted(trainable - covered):
        problems.append(("optimizer.param_names", f"misses trainable parameters {_short(missing)}"))
    if extra := sorted(covered - trainable):
        problems.append(("optimizer.param_names", f"updates parameters that are not trainable {_short(extra)}"))
    if problems:
        raise SpecError(problems)


def _as_spec(obj: Any) -> Any:
    if isinstance(obj, _Spec):
        return obj
    for method in ("get_batch_spec", "to_spec"):
        if hasattr(obj, method):
            return getattr(obj, method)()
    raise SpecError([(type(obj).__name__, "is neither a spec nor an object with get_batch_spec()/to_spec()")])


def _short(names: list[str], limit: int = 6) -> str:
    shown = ", ".join(names[:limit])
    return f"[{shown}{f', … {len(names) - limit} more' if len(names) > limit else ''}]"
