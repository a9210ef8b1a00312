"""The typed run configuration: `StackWiseConfig` and the one error it raises, `ConfigError`.

A config has five sections: `model`, `training`, `data` (required), `schedule` and `run`
(optional). Unknown keys are errors. Every problem is reported at once, each with its dotted
path and the bad value, so a user fixes a file in one pass.

Rules that hold across the whole config (docs/config.md, "Limits"):

- no float anywhere may be NaN or infinite (`_Section`'s `allow_inf_nan=False`);
- a phase's `optimizer_config` / `data_config` obey the same rules as `training.optimizer` /
  `data` / `training`: both levels are typed with the constrained types below (`LearningRate`,
  `Betas`, `MaskRate`, ...), so there is one set of rules;
- a config file is a regular file of at most `MAX_CONFIG_BYTES`, its YAML nests at most
  `MAX_YAML_DEPTH` levels and expands (aliases included) to at most `MAX_YAML_NODES` values;
- the rack never holds more than `MAX_BLOCKS` blocks in any phase (checked by arithmetic, before
  any model is built);
- every value echoed in an error is cut to `MAX_SHOWN` characters.
"""

from __future__ import annotations

import math
import os
import reprlib
import stat
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from stackwise import time_units

# --------------------------------------------------------------------------------------------
# Limits (docs/config.md, "Limits")

MAX_CONFIG_BYTES = 10 * 2**20  # a config file larger than this is refused unread
MAX_YAML_DEPTH = 64  # nesting levels of a YAML document (a config needs about 6)
MAX_YAML_NODES = 1_000_000  # values of a YAML document once aliases are expanded
MAX_SHOWN = 200  # characters of a bad value echoed in an error
MAX_PROBLEMS = 50  # problems listed in one error (the rest are counted)
MAX_BLOCKS = 2048  # blocks in the rack in any phase
MAX_LR = 1e3  # a learning rate above this diverges at once; refused rather than trained
MAX_SEED = 2**63 - 1
MAX_THREADS = 1024

# --------------------------------------------------------------------------------------------
# Errors


class ConfigError(ValueError):
    """A configuration is invalid. `problems` holds (dotted path, message, bad value) triples."""

    def __init__(self, problems: list[tuple[str, str, Any]], source: str | None = None):
        self.problems = problems
        self.source = source
        where = f" in {shorten(str(source))}" if source else ""
        lines = [f"invalid configuration{where} ({len(problems)} problem{'s' * (len(problems) != 1)}):"]
        for path, message, value in problems[:MAX_PROBLEMS]:
            shown = "" if value is _NO_VALUE else f" (got {shown_value(value)})"
            lines.append(f"  {shorten(path or '<root>')}: {shorten(message, 4 * MAX_SHOWN)}{shown}")
        if len(problems) > MAX_PROBLEMS:
            lines.append(f"  ... and {len(problems) - MAX_PROBLEMS} more")
        super().__init__("\n".join(lines))

    @property
    def paths(self) -> list[str]:
        return [p for p, _, _ in self.problems]


_NO_VALUE = object()

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = MAX_SHOWN
_REPR.maxother = MAX_SHOWN
_REPR.maxlong = 60
for _attr in ("maxlist", "maxtuple", "maxdict", "maxset", "maxfrozenset", "maxdeque", "maxarray"):
    setattr(_REPR, _attr, 8)


def shorten(text: str, limit: int = MAX_SHOWN) -> str:
    """`text` cut to `limit` characters, with an ellipsis and the full length when cut."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… ({len(text):,} characters)"


def shown_value(value: Any, limit: int = MAX_SHOWN) -> str:
    """A bounded repr of a user's value for an error message: at most `limit` characters (plus
    the total size), computed without walking more than a few levels of a nested value."""
    if isinstance(value, (str, bytes)):
        return repr(value) if len(value) <= limit else f"{value[:limit]!r}… ({len(value):,} characters)"
    try:
        text = _REPR.repr(value)
    except Exception:  # a hostile __repr__: say what it is, not what it says
        text = f"<{type(value).__name__}>"
    sized = isinstance(value, (list, tuple, dict, set, frozenset))
    size = f" ({len(value):,} items)" if sized else ""
    if len(text) > limit:
        return f"{text[:limit]}…{size}"
    return f"{text}{size}" if sized and "..." in text else text  # reprlib left some out: say how many


class _Section(BaseModel):
    # allow_inf_nan=False: no float field of any section accepts NaN or ±Inf.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, data: Any) -> Any:
        # pydantic reads true as 1 for an int field: `training.total_steps=true` would run 1 step.
        if isinstance(data, Mapping):
            wrong = [(key, value) for key, value in data.items() if isinstance(value, bool)
                     and key in cls.model_fields and _numeric_only(cls.model_fields[key].annotation)]
            if wrong:
                raise _CrossFieldError([(key, "expected a number, not true/false", value) for key, value in wrong])
        return data


def _numeric_only(annotation: Any) -> bool:
    """A field that takes a number (int or float, possibly among other forms) and never a bool."""
    members = getattr(annotation, "__args__", (annotation,))
    return any(a in (int, float) for a in members) and bool not in members


# --------------------------------------------------------------------------------------------
# Reading config files and YAML text safely


class _YamlLimit(Exception):
    """A YAML document beyond the limits (too deep, too many values, self-referencing)."""


class _ConfigLoader(yaml.SafeLoader):
    """PyYAML's safe loader (no tags that run code) that refuses documents nested deeper than
    MAX_YAML_DEPTH while composing them (PyYAML's composer recurses per level)."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                mark = self.peek_event().start_mark
                raise _YamlLimit(f"is nested more than {MAX_YAML_DEPTH} levels deep (at line {mark.line + 1})")
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _node_children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [part for pair in node.value for part in pair]
    return []


def _check_expansion(root: yaml.Node) -> None:
    """Refuse alias bombs: the document's size and depth once every alias is expanded (computed
    on the node graph, shared nodes once, without expanding anything)."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    on_path = {id(root)}
    stack = [(root, iter(_node_children(root)))]
    while stack:
        node, children = stack[-1]
        child = next(children, None)
        if child is None:
            kids = _node_children(node)
            size[id(node)] = 1 + sum(size[id(k)] for k in kids)
            depth[id(node)] = 1 + max((depth[id(k)] for k in kids), default=0)
            if size[id(node)] > MAX_YAML_NODES:
                raise _YamlLimit(f"expands to more than {MAX_YAML_NODES:,} values (aliases of aliases: a YAML bomb?)")
            if depth[id(node)] > MAX_YAML_DEPTH:
                raise _YamlLimit(f"nests more than {MAX_YAML_DEPTH} levels deep once its aliases are expanded")
            on_path.discard(id(node))
            stack.pop()
        elif id(child) in on_path:
            raise _YamlLimit("holds an alias to a node that contains it (a value that contains itself)")
        elif id(child) not in size:
            on_path.add(id(child))
            stack.append((child, iter(_node_children(child))))


def load_yaml(text: str) -> Any:
    """Parse YAML text as a config: safe tags only, depth and alias expansion bounded.
    Raises yaml.YAMLError for bad YAML and _YamlLimit beyond the limits."""
    loader = _ConfigLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _file_kind(mode: int) -> str:
    for test, kind in ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return kind
    return "not a regular file"


def read_config_file(path: str | os.PathLike[str], what: str = "config") -> str:
    """The text of a config-like YAML file, refusing before any read what could hang or flood:
    anything but a regular file (a FIFO, /dev/zero, a socket), a file over MAX_CONFIG_BYTES, and
    text that is not UTF-8. Raises ConfigError naming the path and the cause."""
    source = str(path)

    def refuse(message: str) -> ConfigError:
        return ConfigError([("", message, _NO_VALUE)], source)

    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise refuse(f"{what} file not found") from None
    except (OSError, ValueError) as err:  # ValueError: a NUL byte in the path
        raise refuse(f"cannot read {what}: {getattr(err, 'strerror', None) or err}") from None
    if stat.S_ISDIR(info.st_mode):
        raise refuse("expected a YAML file, got a directory")
    if not stat.S_ISREG(info.st_mode):
        raise refuse(f"expected a YAML file, got {_file_kind(info.st_mode)}")
    if info.st_size > MAX_CONFIG_BYTES:
        raise refuse(f"the file is {info.st_size:,} bytes; a {what} file may hold at most {MAX_CONFIG_BYTES:,}")
    try:
        # O_NONBLOCK: should the path become a FIFO after the stat, the open still returns at once.
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as handle:
            if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
                raise refuse(f"expected a YAML file, got {_file_kind(os.fstat(handle.fileno()).st_mode)}")
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as err:
        raise refuse(f"cannot read {what}: {err.strerror or err}") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise refuse(f"the file holds more than {MAX_CONFIG_BYTES:,} bytes; a {what} file may hold at most that")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise refuse(f"cannot read {what}: not UTF-8 text ({err.reason} at byte {err.start})") from None


def parse_config_yaml(text: str, source: str | None = None) -> Any:
    """`load_yaml` with its errors as ConfigError (line and column of a syntax error)."""
    try:
        return load_yaml(text)
    except _YamlLimit as err:
        raise ConfigError([("", f"refused: the YAML {err}", _NO_VALUE)], source) from None
    except RecursionError:
        raise ConfigError([("", "refused: the YAML is nested too deeply", _NO_VALUE)], source) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError([("", f"not valid YAML{where}: {getattr(err, 'problem', None) or err}", _NO_VALUE)], source) from None


# --------------------------------------------------------------------------------------------
# Values that may change with time inside a phase (DESIGN.md section 4)


class Ramp(_Section):
    """A numeric setting that moves from `start` to `end` over a phase's local time τ ∈ [0, 1)."""

    start: float
    end: float
    shape: Literal["linear", "cosine"] = "linear"

    def at(self, tau: float) -> float:
        tau = min(max(tau, 0.0), 1.0)
        if self.shape == "cosine":
            tau = 0.5 * (1.0 - math.cos(math.pi * tau))
        return self.start + (self.end - self.start) * tau


class LrSchedule(_Section):
    """Learning-rate shape: linear warmup to `peak`, then `schedule` down to `final`, over a
    phase's local time τ (`over: phase`, the default) or over the whole run's t (`over: run`)."""

    schedule: Literal["constant", "linear", "cosine"] = "cosine"
    peak: float = Field(gt=0, le=MAX_LR)
    final: float = Field(default=0.0, ge=0, le=MAX_LR)
    warmup: float = Field(default=0.0, ge=0, lt=1, description="fraction of the phase (or run) spent warming up")
    over: Literal["phase", "run"] = Field(
        default="phase", description="phase: the shape restarts in each phase (τ); run: one shape over the run (t)"
    )

    def at(self, tau: float) -> float:
        """The shape at time τ ∈ [0, 1] of what it spans (a phase's τ, or the run's t for `over: run`)."""
        tau = min(max(tau, 0.0), 1.0)
        if self.warmup > 0 and tau < self.warmup:
            return self.peak * (tau / self.warmup)
        if self.schedule == "constant":
            return self.peak
        progress = (tau - self.warmup) / (1.0 - self.warmup)
        if self.schedule == "linear":
            return self.peak + (self.final - self.peak) * progress
        return self.final + 0.5 * (self.peak - self.final) * (1.0 + math.cos(math.pi * progress))


Number = Union[float, Ramp]  # noqa: UP007 - pydantic reads the union at runtime


# ---- constrained types: one set of rules for a section and for a phase's override of it ----------


class _CrossFieldError(ValueError):
    """Raised inside validators to report several (relative path, message, value) problems."""

    def __init__(self, problems: list[tuple[str, str, Any]]):
        self.problems = problems
        super().__init__("; ".join(f"{p}: {m}" for p, m, _ in problems))


def _lr_in_range(v: float | LrSchedule) -> float | LrSchedule:
    if isinstance(v, (int, float)) and not 0 < v <= MAX_LR:
        raise ValueError(f"learning rate must be > 0 and at most {MAX_LR:g}")
    return v


def _betas_in_range(v: tuple[float, float]) -> tuple[float, float]:
    if not all(0 <= b < 1 for b in v):
        raise ValueError("each beta must lie in [0, 1)")
    return v


def _rate_in_range(v: float | Ramp) -> float | Ramp:
    parts = [("start", v.start), ("end", v.end)] if isinstance(v, Ramp) else [("", v)]
    bad = [(name, "must lie in (0, 1]", rate) for name, rate in parts if not 0 < rate <= 1]
    if bad:
        raise _CrossFieldError(bad)
    return v


def _range_in_order(v: tuple[float, float]) -> tuple[float, float]:
    lo, hi = v
    if not 0 < lo <= hi <= 1:
        raise ValueError("needs 0 < lo <= hi <= 1")
    return v


LearningRate = Annotated[Union[float, LrSchedule], AfterValidator(_lr_in_range)]  # noqa: UP007
Betas = Annotated[tuple[float, float], AfterValidator(_betas_in_range)]
WeightDecay = Annotated[float, Field(ge=0)]
Momentum = Annotated[float, Field(ge=0, lt=1)]
GradClip = Annotated[float, Field(gt=0)]
LrScale = dict[str, Annotated[float, Field(ge=0)]]
LrMultiplier = Annotated[float, Field(gt=0, le=MAX_LR)]
WarmupNew = Annotated[float, Field(ge=0, le=1)]
MaskRate = Annotated[Number, AfterValidator(_rate_in_range)]
MaskRange = Annotated[tuple[float, float], AfterValidator(_range_in_order)]
SeqLen = Annotated[int, Field(ge=2)]
BatchSize = Annotated[int, Field(ge=1)]
OptimizerType = Literal["AdamW", "Adam", "SGD"]


def _token_count(minimum: int) -> Any:
    def parse(v: Any) -> Any:
        return None if v is None else time_units.parse_token_count(v, minimum)
    return BeforeValidator(parse)


# Token counts as written: 1280, "50M", "1.5B" (time_units.parse_token_count); stored as ints.
TokenPosition = Annotated[Union[int, None], _token_count(0)]  # noqa: UP007
TokenLength = Annotated[Union[int, None], _token_count(1)]  # noqa: UP007


def value_at(value: float | Ramp | LrSchedule, tau: float) -> float:
    """Evaluate a plain number or a ramp at local time τ."""
    return float(value) if isinstance(value, (int, float)) else value.at(tau)


# --------------------------------------------------------------------------------------------
# model


class ArchitectureConfig(_Section):
    n_stacks: int = Field(default=2, ge=1)
    blocks_per_stack: Union[int, list[int]] = Field(  # noqa: UP007
        default=2, description="blocks in each stack, or one count per stack (racks grown unevenly)"
    )

    @model_validator(mode="after")
    def _sizes(self) -> ArchitectureConfig:
        sizes = self.blocks_per_stack if isinstance(self.blocks_per_stack, list) else [self.blocks_per_stack]
        problems = [("blocks_per_stack", "every stack needs at least one block", self.blocks_per_stack)] if min(sizes, default=0) < 1 else []
        if isinstance(self.blocks_per_stack, list) and len(self.blocks_per_stack) != self.n_stacks:
            problems.append(("blocks_per_stack", f"needs one count per stack (n_stacks={self.n_stacks})", self.blocks_per_stack))
        total = sum(sizes) if isinstance(self.blocks_per_stack, list) else self.n_stacks * self.blocks_per_stack
        if not problems and total > MAX_BLOCKS:
            key = "n_stacks" if isinstance(self.blocks_per_stack, list) or self.n_stacks >= self.blocks_per_stack else "blocks_per_stack"
            problems.append((key, f"makes a rack of {total:,} blocks; at most {MAX_BLOCKS} are supported", getattr(self, key)))
        if problems:
            raise _CrossFieldError(problems)
        return self

    @property
    def stack_sizes(self) -> list[int]:
        """Blocks in each stack of the starting rack, in rack order."""
        if isinstance(self.blocks_per_stack, list):
            return list(self.blocks_per_stack)
        return [self.blocks_per_stack] * self.n_stacks


class MLAConfig(_Section):
    """Multi-head latent attention sizes (DeepSeek-V2): K/V come from a shared low-rank latent."""

    kv_rank: int | None = Field(default=None, ge=1, description="latent K/V width; default d_model // 4")
    q_rank: int | None = Field(default=None, ge=1, description="low-rank query width; None = full-rank queries")
    rope_dim: int | None = Field(default=None, ge=2, description="decoupled RoPE width per head; default head_dim // 2")


class ModelConfig(_Section):
    vocab_size: int | None = Field(default=None, ge=2, description="default: the tokenizer's vocabulary size")
    d_model: int = Field(default=256, ge=8)
    n_heads: int = Field(default=8, ge=1)
    n_kv_heads: int | None = Field(default=None, ge=1, description="< n_heads gives GQA; default n_heads")
    attention: Literal["mha", "gqa", "mla"] | None = Field(default=None, description="default: gqa if n_kv_heads < n_heads else mha")
    mla: MLAConfig = Field(default_factory=MLAConfig)
    ffn_hidden: int | None = Field(default=None, ge=1, description="SwiGLU width; default 8/3·d_model rounded up to 16")
    max_seq_len: int = Field(default=1024, ge=1, description="longest sequence the RoPE tables cover")
    rope_theta: float = Field(default=10000.0, gt=0)
    norm_eps: float = Field(default=1e-5, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    init_std: float = Field(default=0.02, gt=0)
    tie_embeddings: bool = True
    qkv_bias: bool = Field(default=False, description="biases on the q/k/v projections (Qwen2-style)")
    architecture: ArchitectureConfig = Field(default_factory=ArchitectureConfig)
    init_from: str | None = Field(
        default=None, description="start from these weights: a Hugging Face Llama-family folder, a run directory or a checkpoint folder"
    )
    init_from_optimizer: bool = Field(
        default=False, description="with init_from a run or checkpoint: also bring its optimizer state (matching shapes only)"
    )

    @model_validator(mode="after")
    def _fill_and_check(self) -> ModelConfig:
        kv = self.n_kv_heads if self.n_kv_heads is not None else self.n_heads
        if self.attention is None:
            object.__setattr__(self, "attention", "gqa" if kv < self.n_heads else "mha")
        if self.n_kv_heads is None:
            object.__setattr__(self, "n_kv_heads", self.n_heads if self.attention != "gqa" else max(1, self.n_heads // 2))
        if self.ffn_hidden is None:
            object.__setattr__(self, "ffn_hidden", _round_up(8 * self.d_model / 3, 16))
        problems = []
        if self.d_model % self.n_heads:
            problems.append(("n_heads", f"d_model={self.d_model} is not divisible by n_heads={self.n_heads}", self.n_heads))
        elif (self.d_model // self.n_heads) % 2:
            problems.append(("n_heads", f"head size d_model/n_heads={self.d_model // self.n_heads} must be even for RoPE", self.n_heads))
        if self.n_heads % self.n_kv_heads:
            problems.append(("n_kv_heads", f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}", self.n_kv_heads))
        if self.attention == "mha" and self.n_kv_heads != self.n_heads:
            problems.append(("attention", f"'mha' needs n_kv_heads == n_heads={self.n_heads}; use 'gqa'", self.attention))
        if self.attention == "gqa" and self.n_kv_heads >= self.n_heads and self.n_heads > 1:
            problems.append(("n_kv_heads", f"'gqa' needs n_kv_heads < n_heads={self.n_heads}", self.n_kv_heads))
        if self.init_from is not None and not self.init_from.strip():
            problems.append(("init_from", "is empty; give a folder, or remove the key to start from scratch", self.init_from))
        if self.init_from_optimizer and self.init_from is None:
            problems.append(("init_from_optimizer", "needs model.init_from (a run or checkpoint to take the state from)",
                             self.init_from_optimizer))
        if self.attention == "mla" and self.qkv_bias:
            problems.append(("qkv_bias", "applies to mha/gqa attention, not mla", self.qkv_bias))
        if self.attention == "mla" and not problems:
            head_dim = self.d_model // self.n_heads
            rope_dim = self.mla.rope_dim if self.mla.rope_dim is not None else max(2, head_dim // 2)
            if rope_dim % 2:
                problems.append(("mla.rope_dim", "must be even", rope_dim))
        if problems:
            raise _CrossFieldError(problems)
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def n_blocks(self) -> int:
        return sum(self.architecture.stack_sizes)


def _round_up(x: float, multiple: int) -> int:
    return int(math.ceil(x / multiple) * multiple)


# --------------------------------------------------------------------------------------------
# training


class OptimizerConfig(_Section):
    """The run's optimizer. A phase's `optimizer_config` overrides these fields with values of the
    same types (PhaseOptimizerConfig), so both obey the same rules."""

    optimizer_type: OptimizerType = "AdamW"
    lr: LearningRate = 3e-4
    lr_multiplier: LrMultiplier = Field(default=1.0, description="multiplies the lr shape (a phase's share of a run-wide lr)")
    warmup_new: WarmupNew = Field(
        default=0.0, description="fraction of a phase over which the parameters it adds (growth) warm up from lr 0"
    )
    weight_decay: WeightDecay = 0.1
    betas: Betas = (0.9, 0.95)
    eps: float = Field(default=1e-8, gt=0)
    momentum: Momentum = Field(default=0.9, description="SGD only")
    grad_clip: GradClip | None = Field(default=1.0, description="max global grad norm; null disables clipping")
    lr_scale: LrScale = Field(default_factory=dict, description="parameter-group name pattern -> lr multiplier")
    fused: bool = Field(default=True, description="AdamW/Adam: torch's fused update kernel; false = per-tensor loop")


class TrainingConfig(_Section):
    batch_size: BatchSize = 8
    progressive: ProgressiveConfig = Field(default_factory=lambda: ProgressiveConfig())
    seq_len: SeqLen = 128
    total_steps: int | None = Field(default=None, ge=1, description="run length; TrainingMachine(total_steps=) overrides")
    total_tokens: TokenLength = Field(default=None, description="run length in tokens (batch_size × seq_len per step)")
    total_epochs: float | None = Field(default=None, gt=0, le=time_units.MAX_EPOCHS,
                                       description="run length in epochs of the training split")
    grad_accum_steps: int = Field(default=1, ge=1)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)

    @model_validator(mode="before")
    @classmethod
    def _lr_shorthand(cls, data: Any) -> Any:
        # `training.lr` is accepted as a shorthand for `training.optimizer.lr`.
        if isinstance(data, Mapping) and "lr" in data:
            data = dict(data)
            lr = data.pop("lr")
            optimizer = data.get("optimizer", {})
            if isinstance(optimizer, Mapping):
                data["optimizer"] = {**optimizer, "lr": lr}
        return data

    @model_validator(mode="after")
    def _one_length(self) -> TrainingConfig:
        given = [key for key in time_units.LENGTH_KEYS.values() if getattr(self, key) is not None]
        if len(given) > 1:
            raise _CrossFieldError([(key, f"give the run length once: {' or '.join(given)}, not both", getattr(self, key))
                                    for key in given[1:]])
        return self

    @property
    def length(self) -> tuple[str, Any, str] | None:
        """The run length as written: (unit, value, config path), or None when not set."""
        for unit, key in time_units.LENGTH_KEYS.items():
            if getattr(self, key) is not None:
                return unit, getattr(self, key), f"training.{key}"
        return None


# --------------------------------------------------------------------------------------------
# data


def _byte_count(v: Any) -> Any:
    return time_units.parse_token_count(v, 1, unit="byte")


class TokenizerConfig(_Section):
    kind: Literal["byte", "bpe"] = "byte"
    vocab_size: int = Field(default=4096, ge=300, description="BPE only: size including special tokens")
    path: str | None = Field(default=None, description="load this tokenizer.json instead of training one")
    train_bytes: Annotated[int, BeforeValidator(_byte_count)] = Field(
        default=200_000_000, description="BPE only: text it trains on, a sample of the training split (e.g. 200M)")


Objective = Literal["clm", "mlm", "diffusion"]


class DataConfig(_Section):
    use_dummy_data: bool = False
    paths: list[str] = Field(default_factory=list, description="text files, folders or .jsonl; empty = built-in corpus")
    include: list[str] | None = Field(default=None, description="glob patterns choosing a folder's files; default the known suffixes")
    bin_dtype: Literal["auto", "uint16", "uint32"] = Field(default="auto", description="item size of .bin token files")
    text_field: str = "text"
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    objective: Objective = "clm"
    mask_rate: MaskRate = Field(default=0.15, description="mlm: fraction of tokens selected")
    mask_range: MaskRange = Field(default=(0.02, 1.0), description="diffusion: per-sample rate drawn from [lo, hi]")
    val_fraction: float = Field(default=0.05, gt=0, le=0.5)
    cache_dir: str | None = Field(default=None, description="token cache; default $STACKWISE_CACHE or ~/.cache/stackwise")

    @model_validator(mode="before")
    @classmethod
    def _tokenizer_shorthand(cls, data: Any) -> Any:
        if isinstance(data, Mapping) and isinstance(data.get("tokenizer"), str):
            data = {**data, "tokenizer": {"kind": data["tokenizer"]}}
        return data



# --------------------------------------------------------------------------------------------
# schedule: phases over normalized time


class GrowConfig(_Section):
    """How a phase grows the rack (docs/training.md, "Growth operators").

    - `where: append|prepend`: `n` new stacks next to the head or the embedding, initialised
      `random`, `copy` (of the neighbouring stack) or `identity`;
    - `where: interleave, every: k`: a new stack of `blocks` blocks (default 1) after every k blocks
      of the rack (LLaMA Pro); k must fall on stack boundaries;
    - `init: upscale, trim: m`: depth up-scaling (SOLAR): the rack followed by a copy of itself,
      the last m blocks of the first copy and the first m of the second dropped;
    - `init: stack, factor: k`: the whole rack repeated k times in order (G_stack);
    - `optimizer_state: fresh|copy`: new stacks start with no optimizer state (fresh), or, when
      they are copies of existing blocks, with the state (moments, step count) of what they copy.
    """

    n: int = Field(default=1, ge=1)
    where: Literal["append", "prepend", "interleave"] = "append"
    init: Literal["random", "copy", "identity", "upscale", "stack"] = "random"
    every: int | None = Field(default=None, ge=1, description="interleave: a new stack after every k blocks")
    blocks: int | None = Field(default=None, ge=1, description="blocks per new stack; default the neighbour's (1 for interleave)")
    trim: int | None = Field(default=None, ge=0, description="upscale: blocks dropped at the seam of each copy")
    factor: int | None = Field(default=None, ge=2, description="stack: how many times the rack is repeated")
    optimizer_state: Literal["fresh", "copy"] = Field(
        default="fresh", description="copy: a new stack made of copied blocks starts with their optimizer state"
    )

    @model_validator(mode="after")
    def _operator_fields(self) -> GrowConfig:
        problems = []
        whole_rack = self.init in ("upscale", "stack")
        if self.where == "interleave" and self.every is None:
            problems.append(("every", "where: interleave needs every: K (a new stack after every K blocks)", _NO_VALUE))
        if self.where != "interleave" and self.every is not None:
            problems.append(("every", "only where: interleave takes every", self.every))
        if self.where == "interleave" and whole_rack:
            problems.append(("init", "where: interleave takes init random, copy or identity", self.init))
        if self.init == "upscale" and self.trim is None:
            problems.append(("trim", "init: upscale needs trim: M (blocks dropped at the seam of each copy)", _NO_VALUE))
        if self.init != "upscale" and self.trim is not None:
            problems.append(("trim", "only init: upscale takes trim", self.trim))
        if self.init == "stack" and self.factor is None:
            problems.append(("factor", "init: stack needs factor: K (the rack repeated K times)", _NO_VALUE))
        if self.init != "stack" and self.factor is not None:
            problems.append(("factor", "only init: stack takes factor", self.factor))
        if whole_rack and self.where != "append":
            problems.append(("where", f"init: {self.init} grows the whole rack; where does not apply", self.where))
        if whole_rack and self.n != 1:
            problems.append(("n", f"init: {self.init} grows the whole rack; n does not apply", self.n))
        if whole_rack and self.blocks is not None:
            problems.append(("blocks", f"init: {self.init} copies existing stacks; blocks does not apply", self.blocks))
        if self.optimizer_state == "copy" and not self.copies_blocks:
            problems.append(("optimizer_state", f"copy needs new stacks made of copied blocks (init: copy, stack or "
                             f"upscale, or where: interleave with init identity or copy); init: {self.init} makes "
                             "fresh ones, which have no state to copy", self.optimizer_state))
        if problems:
            raise _CrossFieldError(problems)
        return self

    @property
    def copies_blocks(self) -> bool:
        """Whether the new stacks are copies of existing blocks (rather than fresh ones)."""
        return self.init in ("copy", "stack", "upscale") or (self.where == "interleave" and self.init == "identity")


LoraTarget = Literal["q", "k", "v", "o", "gate", "up", "down", "q_down", "q_up", "kv_down", "k_up", "v_up", "k_rope"]
# The linear layers of one block, by attention kind (model/layers.py): what LoRA targets can name.
_DENSE_LINEARS = {"o", "gate", "up", "down"}


def block_linears(model: ModelConfig) -> set[str]:
    """Names of the linear layers of one block of `model` (the possible LoRA targets)."""
    if model.attention != "mla":
        return _DENSE_LINEARS | {"q", "k", "v"}
    return _DENSE_LINEARS | {"kv_down", "k_up", "v_up", "k_rope"} | ({"q_down", "q_up"} if model.mla.q_rank else {"q"})


class LoraConfig(_Section):
    rank: int = Field(default=8, ge=1, description="at most model.d_model (a higher rank adds no capacity)")
    alpha: float = Field(default=16.0, gt=0)
    dropout: float = Field(default=0.0, ge=0, lt=1)
    targets: list[LoraTarget] = Field(default_factory=lambda: ["q", "k", "v", "o", "gate", "up", "down"], min_length=1)


Precision = Literal["fp32", "bf16", "fp16", "nf4"]


class PhaseModelConfig(_Section):
    """What the model plane looks like during a phase (applied at its start)."""

    grow: GrowConfig | None = None
    trainable: Union[Literal["new", "all"], str, list[int]] = "all"  # noqa: UP007
    trunk: Literal["frozen", "qlora", "trainable"] = "frozen"
    trunk_precision: Precision | None = Field(default=None, description="storage of the trunk; default fp32, nf4 for qlora")
    embedding: Literal["auto", "trainable", "frozen"] = Field(
        default="auto", description="auto: frozen when the stack nearest it is in a frozen/qlora trunk, "
        "unless it is tied to a trainable head"
    )
    head: Literal["trainable", "frozen"] = "trainable"
    lora: LoraConfig = Field(default_factory=LoraConfig)
    stack_precision: dict[int, Literal["fp32", "bf16", "fp16"]] = Field(default_factory=dict)

    @field_validator("trainable")
    @classmethod
    def _trainable_form(cls, v: Any) -> Any:
        if isinstance(v, str) and v not in ("new", "all"):
            head, _, k = v.partition(":")
            if head != "last" or not k.isdigit() or int(k) < 1:
                raise ValueError("use 'new', 'all', 'last:K' (K >= 1) or a list of stack indices")
        return v


class ProgressiveConfig(_Section):
    """Growth settings used by `ProgressiveTrainer.train_rack` (one phase per new stack)."""

    target_stacks: int | None = Field(default=None, ge=1)
    where: Literal["append", "prepend"] = "append"
    init: Literal["random", "copy", "identity"] = "identity"
    trunk: Literal["frozen", "qlora", "trainable"] = "frozen"
    trunk_precision: Precision | None = Field(default=None, description="storage of the trunk; default fp32, nf4 for qlora")
    lora: LoraConfig = Field(default_factory=LoraConfig)
    head: Literal["trainable", "frozen"] = "trainable"


class PhaseDataConfig(_Section):
    """Data settings a phase may override (all optional); same types, so same rules, as `data`
    and `training`."""

    paths: list[str] | None = None
    text_field: str | None = None
    objective: Objective | None = None
    mask_rate: MaskRate | None = None
    mask_range: MaskRange | None = None
    seq_len: SeqLen | None = None
    batch_size: BatchSize | None = None


class PhaseOptimizerConfig(_Section):
    """Optimizer settings a phase may override (all optional); same types, so same rules, as
    `training.optimizer`."""

    optimizer_type: OptimizerType | None = None
    lr: LearningRate | None = None
    lr_multiplier: LrMultiplier | None = None
    warmup_new: WarmupNew | None = None
    weight_decay: WeightDecay | None = None
    betas: Betas | None = None
    momentum: Momentum | None = None
    grad_clip: GradClip | None = None
    lr_scale: LrScale | None = None


class PhaseConfig(_Section):
    name: str = Field(min_length=1)
    start_t: float | None = Field(default=None, ge=0, le=1)
    end_t: float | None = Field(default=None, ge=0, le=1)
    start_step: int | None = Field(default=None, ge=0)
    end_step: int | None = Field(default=None, ge=1)
    start_tokens: TokenPosition = None
    end_tokens: TokenLength = None
    start_epoch: float | None = Field(default=None, ge=0, le=time_units.MAX_EPOCHS)
    end_epoch: float | None = Field(default=None, gt=0, le=time_units.MAX_EPOCHS)
    task: Objective | None = None
    data_config: PhaseDataConfig = Field(default_factory=PhaseDataConfig)
    model_config_: PhaseModelConfig = Field(default_factory=PhaseModelConfig, alias="model_config")
    optimizer_config: PhaseOptimizerConfig = Field(default_factory=PhaseOptimizerConfig)

    model_config = ConfigDict(extra="forbid", populate_by_name=True, validate_assignment=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _one_time_form(self) -> PhaseConfig:
        """One form of bounds per phase (t, steps, tokens or epochs), both keys, start < end."""
        forms = [(unit, keys) for unit, keys in time_units.BOUND_KEYS.items()
                 if any(getattr(self, k) is not None for k in keys)]
        problems: list[tuple[str, str, Any]] = []
        if not forms:
            problems.append(("end_t", "a phase needs its bounds: start_t/end_t, start_step/end_step, "
                                      "start_tokens/end_tokens or start_epoch/end_epoch", _NO_VALUE))
        elif len(forms) > 1:
            given = [k for _, keys in forms for k in keys if getattr(self, k) is not None]
            key = next(k for k in forms[0][1] if getattr(self, k) is not None)
            problems.append((key, f"give the bounds in one form (t, step, tokens or epoch), not several: this phase "
                                  f"gives {', '.join(given)}", getattr(self, key)))
        else:
            start, end = forms[0][1]
            if getattr(self, start) is None or getattr(self, end) is None:
                missing = end if getattr(self, end) is None else start
                problems.append((missing, f"{start} and {end} go together", None))
            elif getattr(self, start) >= getattr(self, end):
                problems.append((end, f"must be greater than {start}={getattr(self, start)}", getattr(self, end)))
        if problems:
            raise _CrossFieldError(problems)
        return self

    @property
    def time_unit(self) -> str:
        """The unit its bounds are given in: t, step, tokens or epoch."""
        return next((unit for unit, keys in time_units.BOUND_KEYS.items() if getattr(self, keys[0]) is not None), "t")

    def bounds_t(self, total_steps: int | None) -> tuple[float, float] | None:
        """(start_t, end_t), converting steps with the run's total; None when that is unknown, and
        for bounds in tokens or epochs, which convert with the whole schedule
        (`StackWiseConfig.in_steps`)."""
        if self.start_t is not None:
            return self.start_t, self.end_t
        if total_steps is None or self.start_step is None:
            return None
        return self.start_step / total_steps, self.end_step / total_steps


# --------------------------------------------------------------------------------------------
# run


class WandbConfig(_Section):
    """Settings of the Weights & Biases logger (`run.loggers: [wandb]`; docs/events.md)."""

    project: str = Field(default="stackwise", min_length=1)
    entity: str | None = Field(default=None, description="W&B team or user; default: your default entity")
    name: str | None = Field(default=None, description="run name in W&B; default: the run directory's name")
    mode: Literal["offline", "online", "disabled"] | None = Field(
        default=None, description="default: the WANDB_MODE environment variable, else offline"
    )
    tags: list[str] = Field(default_factory=list)
    dir: str | None = Field(default=None, description="where wandb writes its files; default: the run directory")


class RunConfig(_Section):
    name: str = Field(default="run", min_length=1)
    dir: str = Field(default="runs", description="parent folder of run directories")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(default="auto", description="auto = bf16 autocast on CUDA, fp32 on CPU")
    compile: bool = False
    activation_cache: bool | Literal["auto"] = Field(
        default="auto", description="cache a frozen trunk's output per sample: auto = where samples repeat in the phase "
        "(it crosses an epoch), true = wherever valid (warns when no sample repeats), false = never"
    )
    cache_ram_mb: int = Field(default=2048, ge=0, description="RAM for cached activations; the rest spills to files")
    eval_every: int = Field(default=100, ge=1)
    eval_batches: int = Field(default=8, ge=1)
    log_every: int = Field(default=10, ge=1)
    checkpoint_every: int | None = Field(default=None, ge=1)
    checkpoint_at_transitions: bool = True
    keep_last: int = Field(default=3, ge=1)
    on_nonfinite: Literal["stop", "skip_step"] = Field(
        default="stop", description="a NaN/Inf loss or gradient: stop the run, or skip that update (one host sync per step)"
    )
    threads: int | None = Field(default=None, ge=1, le=MAX_THREADS, description="CPU threads; default: torch's choice")
    distributed: Literal["ddp", "fsdp"] = Field(
        default="ddp", description="data parallelism when torchrun starts several ranks: ddp replicates, fsdp shards"
    )
    loggers: list[Literal["wandb"]] = Field(
        default_factory=list, description="external loggers besides metrics.jsonl (and TensorBoard when installed)"
    )
    wandb: WandbConfig = Field(default_factory=WandbConfig)
    memory_check: bool = Field(
        default=True, description="refuse a run whose estimated peak memory exceeds the device's (training/fits.py)"
    )

    @field_validator("name")
    @classmethod
    def _plain_name(cls, v: str) -> str:
        # The name becomes a folder under run.dir: it must not climb out of it.
        if v in (".", "..") or "/" in v or "\\" in v or os.sep in v:
            raise ValueError("must be a plain folder name (no '/', '\\', '.' or '..')")
        return v


TrainingConfig.model_rebuild()

# --------------------------------------------------------------------------------------------
# the whole config


class StackWiseConfig(_Section):
    model: ModelConfig
    training: TrainingConfig
    data: DataConfig
    schedule: list[PhaseConfig] | None = None
    run: RunConfig = Field(default_factory=RunConfig)
    # What the user wrote for time in tokens or epochs, kept by `in_steps` for the run's config.yaml.
    _time_given: list[str] = PrivateAttr(default_factory=list)

    @field_validator("schedule")
    @classmethod
    def _non_empty(cls, v: list[PhaseConfig] | None) -> list[PhaseConfig] | None:
        if v is not None and not v:
            raise ValueError("needs at least one phase (or leave it out for a single phase)")
        return v

    @model_validator(mode="after")
    def _check_whole(self) -> StackWiseConfig:
        problems = _time_problems(self)
        seq_lens = [self.training.seq_len] + [p.data_config.seq_len for p in self.schedule or [] if p.data_config.seq_len]
        accum = self.training.grad_accum_steps
        batch_sizes = [("training.batch_size", self.training.batch_size)] + [
            (f"schedule.{i}.data_config.batch_size", p.data_config.batch_size)
            for i, p in enumerate(self.schedule or []) if p.data_config.batch_size
        ]
        for path, size in batch_sizes:
            if size % accum:
                problems.append((path, f"must be divisible by training.grad_accum_steps={accum}", size))
        if max(seq_lens) > self.model.max_seq_len:
            problems.append(("model.max_seq_len", f"is shorter than the longest sequence {max(seq_lens)}", self.model.max_seq_len))
        problems += self._structure_problems()
        if problems:
            raise _CrossFieldError(problems)
        return self

    def _structure_problems(self) -> list[tuple[str, str, Any]]:
        """Rules that need the rack of each phase, found by arithmetic on block counts (no model
        is built): the MAX_BLOCKS bound, `stack_precision` positions, LoRA rank and targets."""
        racks, problems = rack_sizes(self)
        linears = block_linears(self.model)
        loras = [("training.progressive.lora", self.training.progressive.lora)]
        loras += [(f"schedule.{i}.model_config.lora", p.model_config_.lora) for i, p in enumerate(self.schedule or [])]
        for path, lora in loras:
            if lora.rank > self.model.d_model:
                problems.append((f"{path}.rank", f"exceeds model.d_model={self.model.d_model}: a higher rank adds "
                                 "parameters and no capacity", lora.rank))
            if not set(lora.targets) & linears:
                problems.append((f"{path}.targets", f"names no linear layer of this model's {self.model.attention} "
                                 f"blocks; they are {sorted(linears)}", lora.targets))
        for i, phase in enumerate(self.schedule or []):
            sizes = racks[i] if i < len(racks) else None
            if sizes is None:
                continue
            for position in phase.model_config_.stack_precision:
                if not 0 <= position < len(sizes):
                    problems.append((f"schedule.{i}.model_config.stack_precision.{position}",
                                     f"there is no stack {position}: the rack has {len(sizes)} stacks in this phase "
                                     f"(positions 0..{len(sizes) - 1})", position))
        return problems

    # ---- construction -------------------------------------------------------------------

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str | None = None) -> StackWiseConfig:
        if not isinstance(data, Mapping):
            raise ConfigError([("", f"a config must be a mapping of sections, not {type(data).__name__}", data)], source)
        try:
            return cls.model_validate(dict(data))
        except ValidationError as err:
            raise ConfigError(_problems_from(err), source) from None

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> StackWiseConfig:
        path = Path(path)
        data = parse_config_yaml(read_config_file(path), str(path))
        if data is None:
            raise ConfigError([("", "the file is empty; it needs model, training and data sections", _NO_VALUE)], str(path))
        return cls.from_dict(data, source=str(path))

    @classmethod
    def load(cls, config: StackWiseConfig | Mapping[str, Any] | str | os.PathLike[str]) -> StackWiseConfig:
        """Accept a config object, a plain dict or a YAML path."""
        if isinstance(config, StackWiseConfig):
            return config
        if isinstance(config, Mapping):
            return cls.from_dict(config)
        if isinstance(config, (str, os.PathLike)):
            return cls.from_yaml(config)
        raise ConfigError([("", "expected a StackWiseConfig, a dict or a YAML path", type(config).__name__)])

    # ---- export -------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json", by_alias=True)

    def to_yaml(self, path: str | os.PathLike[str] | None = None) -> str:
        """The config as YAML. A config converted from tokens or epochs (`in_steps`) opens with
        comment lines saying what was written and what it became."""
        text = yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)
        if self._time_given:
            text = "".join(f"# {line}\n" for line in self._time_given) + text
        if path is not None:
            Path(path).write_text(text, encoding="utf-8")
        return text

    def with_overrides(self, overrides: Iterable[str]) -> StackWiseConfig:
        """Return a copy with `a.b.c=value` overrides applied (values parsed as YAML scalars).

        Overrides apply to what was given, not to derived defaults, so `model.d_model=512`
        re-derives `ffn_hidden` and `model.n_heads=4` re-derives `n_kv_heads`."""
        data = self.model_dump(mode="json", by_alias=True, exclude_unset=True)
        problems = []
        for item in overrides:
            try:
                _apply_override(data, item)
            except ValueError as err:
                problems.append((item.partition("=")[0].strip(), str(err), item))
        if problems:
            raise ConfigError(problems, "overrides")
        return StackWiseConfig.from_dict(data, source="overrides")

    # ---- derived values -----------------------------------------------------------------

    def resolved_total_steps(self, total_steps: int | None = None, train_tokens: TrainTokens = None) -> int:
        """The run length in steps: `total_steps` if given, else the config's (converted from
        tokens or epochs as `in_steps` does)."""
        if total_steps is not None:
            return total_steps
        if self.training.total_steps is not None:
            return self.training.total_steps
        return self.in_steps(None, train_tokens).training.total_steps

    # ---- time in units (docs/schedule.md, "Time in tokens and epochs") -----------------------

    def uses_time_units(self) -> bool:
        """Whether the run length or any phase bound is given in tokens or epochs."""
        return self.training.total_tokens is not None or self.training.total_epochs is not None or \
            any(p.time_unit in ("tokens", "epoch") for p in self.schedule or [])

    def epoch_keys(self, total_steps: int | None = None) -> list[str]:
        """Config paths given in epochs (they need the training split's token count to convert);
        with an explicit `total_steps`, the run length no longer counts."""
        keys = ["training.total_epochs"] if self.training.total_epochs is not None and total_steps is None else []
        return keys + [f"schedule.{i}.start_epoch" for i, p in enumerate(self.schedule or []) if p.time_unit == "epoch"]

    def time_rates(self, train_tokens: TrainTokens = None) -> list[time_units.Rate]:
        """How far one step of each phase (one entry without a schedule) advances the token and
        epoch clocks: batch_size × seq_len tokens; batch_size windows of the phase's training
        split, which holds `train_tokens // (seq_len + 1)` windows. `train_tokens` is the count of
        that split (an int for every phase, or a function of (paths, text_field) for each phase's
        own corpus), None when unknown."""
        rates = []
        for phase in self.schedule or [None]:
            over = phase.data_config if phase is not None else PhaseDataConfig()
            batch = over.batch_size or self.training.batch_size
            seq_len = over.seq_len or self.training.seq_len
            windows = None
            if train_tokens is not None:
                if isinstance(train_tokens, int):
                    count = train_tokens
                else:
                    paths = over.paths if over.paths is not None else self.data.paths
                    count = train_tokens(list(paths), over.text_field or self.data.text_field)
                windows = count // (seq_len + 1)
            rates.append(time_units.Rate(batch, seq_len, windows))
        return rates

    def time_layout(self, total_steps: int | None = None, train_tokens: TrainTokens = None) -> time_units.Layout:
        """The run converted to steps (time_units.lay_out): its length, each phase's step range, and
        the problems of its bounds. Without a schedule, one phase over the whole run."""
        phases = [time_units.Bounds("main", "t", 0.0, 1.0, ("schedule.0.start_t", "schedule.0.end_t"))]
        if self.schedule:
            phases = [_bounds(i, p) for i, p in enumerate(self.schedule)]
        return time_units.lay_out(phases, self.time_rates(train_tokens), self.training.length, total_steps)

    def in_steps(self, total_steps: int | None = None, train_tokens: TrainTokens = None) -> StackWiseConfig:
        """This config with the run length in steps (`training.total_steps`) and, when any time is
        given in tokens or epochs, every phase bound in steps too (`start_step`/`end_step`): the
        form the machine runs and records. An explicit `total_steps` replaces the config's length.
        Epochs need `train_tokens` (see `time_rates`). Raises ConfigError naming the field."""
        if self.training.length is None and total_steps is None:
            raise ConfigError([("training.total_steps", "the run length is not set (give total_steps, total_tokens "
                                "or total_epochs)", None)])
        if not self.uses_time_units():  # steps and t: only the length, as given
            steps = total_steps if total_steps is not None else self.training.total_steps
            return self if steps == self.training.total_steps else self.with_overrides([f"training.total_steps={steps}"])
        layout = self.time_layout(total_steps, train_tokens)
        problems = _name_problems(self.schedule) + layout.problems
        if problems:
            raise ConfigError(problems)
        if layout.total_steps is None or any(None in r for r in layout.ranges):
            raise ConfigError([(key, "is in epochs, which count windows of the training split: its token count is "
                                     "needed (known once the corpus is read)", _NO_VALUE)
                               for key in self.epoch_keys(total_steps) or ["training.total_epochs"]])
        problems = [(f"schedule.{i}.{time_units.BOUND_KEYS[p.time_unit][1]}",
                     f"phase {p.name!r} gets no step of the {layout.total_steps} total steps (it rounds to step "
                     f"{first}); lengthen it or the run", getattr(p, time_units.BOUND_KEYS[p.time_unit][1]))
                    for i, (p, (first, end)) in enumerate(zip(self.schedule or [], layout.ranges, strict=False))
                    if end <= first]
        if problems:
            raise ConfigError(problems)
        data = self.model_dump(mode="json", by_alias=True, exclude_unset=True)
        training = data.setdefault("training", {})
        for key in time_units.LENGTH_KEYS.values():
            training.pop(key, None)
        training["total_steps"] = layout.total_steps
        for phase, (first, end) in zip(data.get("schedule") or [], layout.ranges, strict=False):
            for keys in time_units.BOUND_KEYS.values():
                for key in keys:
                    phase.pop(key, None)
            phase["start_step"], phase["end_step"] = first, end
        converted = StackWiseConfig.from_dict(data, source="the config converted to steps")
        converted._time_given = self._time_record(layout)
        return converted

    def _time_record(self, layout: time_units.Layout) -> list[str]:
        """Comment lines for the run's config.yaml: the time as written, and the steps it became."""
        lines = ["time as written, converted exactly to steps (docs/schedule.md, \"Time in tokens and epochs\"):"]
        length = self.training.length
        if length is not None and length[0] != "step":
            lines.append(f"  {length[2]}: {length[1]}  ->  training.total_steps: {layout.total_steps}")
        for i, (phase, (first, end)) in enumerate(zip(self.schedule or [], layout.ranges, strict=False)):
            if phase.time_unit != "step":
                start_key, end_key = time_units.BOUND_KEYS[phase.time_unit]
                lines.append(f"  schedule.{i} ({phase.name}): {start_key}: {getattr(phase, start_key)}, {end_key}: "
                             f"{getattr(phase, end_key)}  ->  start_step: {first}, end_step: {end}")
        return lines


# A training split's token count: one int, or a function of (paths, text_field) for each phase's corpus.
TrainTokens = Union[int, Callable[[list[str], str], int], None]  # noqa: UP007


def _bounds(index: int, phase: PhaseConfig) -> time_units.Bounds:
    start_key, end_key = time_units.BOUND_KEYS[phase.time_unit]
    return time_units.Bounds(phase.name, phase.time_unit, getattr(phase, start_key), getattr(phase, end_key),
                             (f"schedule.{index}.{start_key}", f"schedule.{index}.{end_key}"))


# --------------------------------------------------------------------------------------------
# helpers


def _name_problems(schedule: list[PhaseConfig] | None) -> list[tuple[str, str, Any]]:
    names = [p.name for p in schedule or []]
    return [(f"schedule.{i}.name", "phase names must be unique", name) for i, name in enumerate(names)
            if names.index(name) != i]


def _schedule_problems(schedule: list[PhaseConfig] | None, total_steps: int | None) -> list[tuple[str, str, Any]]:
    """Phases must tile [0, 1]: first at 0, each where the previous ends, last at the end, names
    unique (phases in t or steps; a config's phases in tokens or epochs: `_time_problems`)."""
    if not schedule:
        return []
    layout = time_units.lay_out([_bounds(i, p) for i, p in enumerate(schedule)], None, None, total_steps)
    return _name_problems(schedule) + layout.problems


def _time_problems(config: StackWiseConfig, total_steps: int | None = None) -> list[tuple[str, str, Any]]:
    """The schedule's tiling, checked in each phase's own unit and, where units differ, in steps as
    far as the config alone allows (epochs wait for the corpus, steps for the run length)."""
    if not config.schedule and not config.uses_time_units():
        return []
    return _name_problems(config.schedule) + config.time_layout(total_steps).problems


def rack_sizes(config: StackWiseConfig) -> tuple[list[list[int] | None], list[tuple[str, str, Any]]]:
    """Blocks per stack after each phase's growth, by arithmetic alone (the same operators as
    training/progressive.py), and the problems of growth beyond MAX_BLOCKS. A phase whose growth
    cannot apply (reported when the rack is built) ends the replay: its entry and the later
    ones are None. A config without a schedule but with `training.progressive.target_stacks`
    grows one stack per phase."""
    sizes: list[int] | None = config.model.architecture.stack_sizes
    if config.schedule is None:
        target = config.training.progressive.target_stacks
        if target is not None and target > len(sizes):
            neighbour = sizes[-1] if config.training.progressive.where == "append" else sizes[0]
            total = sum(sizes) + (target - len(sizes)) * neighbour
            if total > MAX_BLOCKS:
                return [], [("training.progressive.target_stacks", f"grows the rack to {total:,} blocks; at most "
                             f"{MAX_BLOCKS} are supported", target)]
        return [], []
    racks: list[list[int] | None] = []
    for i, phase in enumerate(config.schedule):
        grow = phase.model_config_.grow
        if sizes is not None and grow is not None:
            sizes, problem = _grown(sizes, grow, f"schedule.{i}.model_config.grow")
            if problem:
                return racks + [None] * (len(config.schedule) - i), [problem]
        racks.append(sizes)
    return racks, []


def _grown(sizes: list[int], grow: GrowConfig, field: str) -> tuple[list[int] | None, tuple[str, str, Any] | None]:
    """`sizes` after one growth; (None, None) when the operator cannot apply to this rack (the
    model plane reports why), (None, problem) when it would exceed MAX_BLOCKS."""
    total = sum(sizes)

    def too_big(key: str, blocks: int) -> tuple[None, tuple[str, str, Any]]:
        return None, (f"{field}.{key}", f"grows the rack to {blocks:,} blocks; at most {MAX_BLOCKS} are supported",
                      getattr(grow, key))

    if grow.init == "stack":
        if total * grow.factor > MAX_BLOCKS:
            return too_big("factor", total * grow.factor)
        return sizes * grow.factor, None
    if grow.init == "upscale":
        if grow.trim >= total:
            return None, None
        return _keep(sizes, 0, total - grow.trim) + _keep(sizes, grow.trim, total), None
    if grow.where == "interleave":
        blocks = grow.blocks or 1
        points = set(range(grow.every, total + 1, grow.every))
        ends = [sum(sizes[: j + 1]) for j in range(len(sizes))]
        if not points or not points <= set(ends):
            return None, None
        if total + len(points) * blocks > MAX_BLOCKS:
            return too_big("every" if grow.blocks is None else "blocks", total + len(points) * blocks)
        out: list[int] = []
        for size, end in zip(sizes, ends, strict=True):
            out += [size, blocks] if end in points else [size]
        return out, None
    neighbour = sizes[-1] if grow.where == "append" else sizes[0]
    blocks = grow.blocks or neighbour
    if total + grow.n * blocks > MAX_BLOCKS:
        return too_big("blocks" if grow.blocks and grow.blocks > grow.n else "n", total + grow.n * blocks)
    new = [blocks] * grow.n
    return (sizes + new if grow.where == "append" else new + sizes), None


def _keep(sizes: list[int], start: int, end: int) -> list[int]:
    """Stack sizes when only blocks [start, end) of the concatenated stacks are kept (empty
    stacks go)."""
    out, offset = [], 0
    for size in sizes:
        kept = max(0, min(end, offset + size) - max(start, offset))
        if kept:
            out.append(kept)
        offset += size
    return out


def check_schedule(config: StackWiseConfig, total_steps: int) -> None:
    """Raise ConfigError if the phases do not tile the run of `total_steps` steps."""
    problems = _time_problems(config, total_steps)
    if problems:
        raise ConfigError(problems)


def _problems_from(err: ValidationError) -> list[tuple[str, str, Any]]:
    problems = []
    for e in _without_union_noise(err.errors(include_url=False)):
        # pydantic appends the union member's name ("float", "Ramp", ...) to the path: drop it.
        loc = [str(part) for part in e["loc"] if not _is_type_tag(str(part))]
        ctx_error = (e.get("ctx") or {}).get("error")
        if isinstance(ctx_error, _CrossFieldError):
            for rel, message, value in ctx_error.problems:
                problems.append((".".join([*loc, rel] if rel else loc), message, value))
            continue
        message = e["msg"].removeprefix("Value error, ")
        value = e.get("input", _NO_VALUE) if e["type"] != "missing" else _NO_VALUE
        if e["type"] == "missing":
            message = "is required"
        problems.append((".".join(loc), message, value))
    # Deduplicate (a union reports the same path once per member).
    seen, unique = set(), []
    for path, message, value in problems:
        if (path, message) not in seen:
            seen.add((path, message))
            unique.append((path, message, value))
    return unique


def _is_type_mismatch(error: Mapping[str, Any]) -> bool:
    return error["type"].endswith(("_type", "_parsing")) or error["type"] == "is_instance_of"


def _without_union_noise(errors: list[Any]) -> list[Any]:
    """A value checked against a union (a number or a ramp, ...) fails once per member. When it
    has the type of one member and breaks that member's rule ("must be > 0"), the other members'
    "should be a valid dictionary" is noise: keep only the rule. When it fits no member, keep all."""
    def union_key(error: Mapping[str, Any]) -> tuple[Any, ...] | None:
        loc = [str(p) for p in error["loc"]]
        tags = [i for i, part in enumerate(loc) if _is_type_tag(part)]
        return tuple(error["loc"][: tags[0]]) if tags else None

    informative = {union_key(e) for e in errors if union_key(e) is not None and not _is_type_mismatch(e)}
    return [e for e in errors if not (_is_type_mismatch(e) and union_key(e) in informative)]


_TYPE_TAGS = {"float", "int", "str", "bool", "list[int]", "Ramp", "LrSchedule", "literal['new','all']", "function-after[_trainable_form(), union[literal['new','all'],str,list[int]]]"}


def _is_type_tag(part: str) -> bool:
    return part in _TYPE_TAGS or part.startswith(("literal[", "function-", "union["))


def _apply_override(data: dict[str, Any], item: str) -> None:
    key, sep, raw = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ValueError("expected key=value, e.g. training.optimizer.lr=3e-4")
    try:
        value = load_yaml(raw) if raw.strip() else None
    except _YamlLimit as err:
        raise ValueError(f"value refused: the YAML {err}") from None
    except yaml.YAMLError as err:
        raise ValueError(f"value is not valid YAML: {getattr(err, 'problem', None) or err}") from None
    parts = key.split(".")
    if not all(parts):
        raise ValueError("a key is dotted names without empty parts, e.g. training.optimizer.lr")
    if parts[:2] == ["training", "lr"] and len(parts) == 2:
        parts = ["training", "optimizer", "lr"]
    node: Any = data
    for depth, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(f"'{'.'.join(parts[: depth + 1])}' is not an index of the list")
            node = node[int(part)]
        elif isinstance(node, dict):
            if node.get(part) is None:
                node[part] = {}
            node = node[part]
        else:
            raise ValueError(f"'{'.'.join(parts[:depth])}' is not a section")
    last = parts[-1]
    if isinstance(node, list):
        if not last.isdigit() or int(last) >= len(node):
            raise ValueError("is not an index of the list")
        node[int(last)] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ValueError(f"'{'.'.join(parts[:-1])}' is a value ({shown_value(node)}), not a section with keys")
