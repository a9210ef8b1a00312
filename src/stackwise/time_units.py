"""Time in units: a run's length and its phases' bounds given in steps, normalized t, tokens or
epochs, converted exactly to steps (docs/schedule.md, "Time in tokens and epochs").

Pure arithmetic on integers and fractions, no torch and no corpus: the caller says how far one
step of each phase advances each clock (`Rate`: batch size × seq_len tokens; batch_size windows
of an epoch of `windows` windows) and, for epochs, how many windows the phase's training split holds.

The rules:

- a position in tokens or epochs is a point on the run's cumulative clock, which each step
  advances by its phase's rate, phase after phase in order (piecewise);
- a bound lands on the first step at which the clock has reached it: `ceil` of an exact
  fraction, so a bound that falls inside a step rounds up to the next step (the same rule as
  `step_at(t) = ceil(t · N)` for t);
- a run length in tokens or epochs is the first step at which the clock reaches it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

Problem = tuple[str, str, Any]

UNITS = ("t", "step", "tokens", "epoch")
BOUND_KEYS = {
    "t": ("start_t", "end_t"),
    "step": ("start_step", "end_step"),
    "tokens": ("start_tokens", "end_tokens"),
    "epoch": ("start_epoch", "end_epoch"),
}
LENGTH_KEYS = {"step": "total_steps", "tokens": "total_tokens", "epoch": "total_epochs"}

# Products t·N are rounded to this many decimals before ceil(): 0.07 · 100 = 7.000000000000001 must
# give step 7, not 8. Nine decimals is far finer than any 1/N a run can have.
STEP_DECIMALS = 9
# t boundaries closer than this are the same boundary.
T_EPS = 1e-9

_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}
_COUNT = re.compile(r"(?P<number>[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9][0-9_]*)(?:e(?P<exp>[+-]?[0-9]{1,3}))?\s*(?P<suffix>[kmbt]?)",
                    re.IGNORECASE)
MAX_TOKENS = 10**18  # a token count above this is a typo, not a run (the largest runs are ~10^14)
MAX_EPOCHS = 1e6  # likewise for epochs
TOKEN_COUNT_HELP = "a whole number of tokens, optionally with K, M, B or T (10^3, 10^6, 10^9, 10^12), e.g. 1280, 50M or 1.5B"


def step_at(t: float, total_steps: int) -> int:
    """The first step whose time k / N is ≥ t: ceil(t · N), robust to float error in t · N."""
    return math.ceil(round(t * total_steps, STEP_DECIMALS))


# --------------------------------------------------------------------------------------------
# Values as written


def parse_token_count(value: Any, minimum: int = 0, unit: str = "token") -> int:
    """A token count as written in a config: an int, a whole float (1.5e9) or a string with an
    optional K/M/B/T suffix ("50M", "1.5B", "1_000"). Exact: "1.5B" is 1_500_000_000. Raises
    ValueError saying what is accepted. `unit`: what is counted, for messages ("byte" for
    data.tokenizer.train_bytes)."""
    help_text = TOKEN_COUNT_HELP.replace("token", unit)
    if isinstance(value, bool):
        raise ValueError(f"is not a {unit} count: expected {help_text}")
    if isinstance(value, int):
        count = Fraction(value)
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"is not a {unit} count: expected {help_text}")
        count = Fraction(repr(value))
    elif isinstance(value, str):
        match = _COUNT.fullmatch(value.strip()) if len(value) <= 100 else None
        if match is None:
            raise ValueError(f"is not a {unit} count: expected {help_text}")
        try:
            number = Fraction(match["number"].replace("_", ""))
        except ValueError:
            raise ValueError(f"is not a {unit} count: expected {help_text}") from None
        count = number * Fraction(10) ** int(match["exp"] or 0) * _SUFFIXES[match["suffix"].lower()]
    else:
        raise ValueError(f"is not a {unit} count: expected {help_text}")
    if count > MAX_TOKENS:
        raise ValueError(f"is more than 10^18 {unit}s (a typo?)")
    if count.denominator != 1:
        raise ValueError(f"is {float(count):g} {unit}s, not a whole number of {unit}s")
    if count < minimum:
        raise ValueError(f"must be at least {minimum} {unit}{'s' * (minimum != 1)}")
    return int(count)


def exact(value: float | int | Fraction) -> Fraction:
    """A number as the decimal it was written as: 0.1 is 1/10 (the shortest repr of the float),
    so epochs convert exactly as the user wrote them."""
    if isinstance(value, Fraction):
        return value
    if isinstance(value, int):
        return Fraction(value)
    return Fraction(repr(float(value)))


def where(unit: str, value: Any) -> str:
    """A position in its unit, for messages: t=0.5, step 10, 1,280 tokens, epoch 1.5."""
    if unit == "t":
        return f"t={float(value):g}"
    if unit == "step":
        return f"step {value}"
    if unit == "tokens":
        return f"{int(value):,} tokens"
    return f"epoch {float(value):g}"


# --------------------------------------------------------------------------------------------
# Clocks


@dataclass(frozen=True)
class Rate:
    """How far one step of a phase advances each clock: `batch_size × seq_len` tokens, and
    `batch_size / windows` epochs, where `windows` = training tokens // (seq_len + 1) is the
    number of windows the loader cuts from the phase's training split (None: not known here)."""

    batch_size: int
    seq_len: int
    windows: int | None = None

    @property
    def tokens(self) -> int:
        return self.batch_size * self.seq_len

    def per_step(self, unit: str) -> Fraction | None:
        if unit == "tokens":
            return Fraction(self.tokens)
        if unit == "step":
            return Fraction(1)
        if unit == "epoch" and self.windows:
            return Fraction(self.batch_size, self.windows)
        return None


@dataclass(frozen=True)
class Bounds:
    """One phase's [start, end) as written: its unit, exact values and the config paths of both keys."""

    name: str
    unit: str
    start: Any
    end: Any
    keys: tuple[str, str]


@dataclass
class Layout:
    """The run converted to steps: its length, each phase's [first, end) steps (None where not
    convertible here, e.g. epochs before the corpus is known), and every problem found."""

    total_steps: int | None
    ranges: list[tuple[int | None, int | None]]
    problems: list[Problem]


def lay_out(phases: Sequence[Bounds], rates: Sequence[Rate] | None, length: tuple[str, Any, str] | None,
            total_steps: int | None = None) -> Layout:
    """Convert `phases` (in order) to steps and check that they tile the run.

    `length` is the run length as written: (unit, value, config path), or None; an explicit
    `total_steps` (TrainingMachine(total_steps=N), --steps N) replaces it. Without a length, or
    where a clock's rate is unknown, the conversions that need it are skipped, not guessed."""
    problems: list[Problem] = []
    rates = list(rates) if rates is not None else [None] * len(phases)
    if total_steps is not None:
        length = ("step", total_steps, "training.total_steps")
    n = length[1] if length is not None and length[0] == "step" else None
    if length is not None and n is None:
        n, problem = _length_from_rates(phases, rates, length)
        problems += problem
    clock = _Clock()
    ranges: list[tuple[int | None, int | None]] = []
    for bounds, rate in zip(phases, rates, strict=True):
        first, end = (clock.step_of(bounds.unit, value, rate, n) for value in (bounds.start, bounds.end))
        ranges.append((first, end))
        clock.advance(end, rate)
    if length is not None and n is None and not problems:
        n = clock.step_of(length[0], exact(length[1]), rates[-1] if rates else None, None)
    problems += _tiling_problems(phases, ranges, length, n)
    return Layout(n, ranges, problems)


def _length_from_rates(phases: Sequence[Bounds], rates: list[Rate | None], length: tuple[str, Any, str]
                       ) -> tuple[int | None, list[Problem]]:
    """The run length in steps when every phase advances the length's clock at the same rate (it
    is then ceil(length / rate), whatever the layout); None when it needs the layout."""
    unit, value, _ = length
    pers = [r.per_step(unit) if r is not None else None for r in rates]
    if pers and None not in pers and len(set(pers)) == 1:
        return math.ceil(exact(value) / pers[0]), []
    timed = [b for b in phases if b.unit == "t"]
    if not timed or None in pers:
        return None, []  # from the layout (or not known here: epochs before the corpus is read)
    b = timed[0]
    shown = ", ".join(sorted({f"{float(p):g}" for p in pers}, key=float))
    plural = "tokens" if unit == "tokens" else "epochs"
    return None, [(b.keys[1], f"is a fraction of the run, but the run length is in {plural} and the phases advance "
                              f"by different {plural} per step ({shown}), so a t bound is no fixed step; give this "
                              f"phase's bounds in steps, tokens or epochs", b.end)]


class _Clock:
    """The cumulative tokens and epochs at the end of the phases laid out so far (the frontier),
    and the segments behind it, to place a bound that lies before the frontier."""

    def __init__(self) -> None:
        self.frontier: int | None = 0
        self.at: dict[str, Fraction | None] = {"tokens": Fraction(0), "epoch": Fraction(0)}
        self.segments: list[tuple[int, int, Rate]] = []

    def step_of(self, unit: str, value: Any, rate: Rate | None, n: int | None) -> int | None:
        if unit == "t":
            return None if n is None else step_at(value, n)
        if unit == "step":
            return value
        x, here = exact(value), self.at.get(unit)
        if self.frontier is None or here is None:
            return None
        if x >= here:
            per = rate.per_step(unit) if rate is not None else None
            return None if per is None else self.frontier + math.ceil((x - here) / per)
        reached = Fraction(0)
        for first, end, seg_rate in self.segments:
            per = seg_rate.per_step(unit)
            span = (end - first) * per
            if x < reached + span:
                return first + math.ceil((x - reached) / per)
            reached += span
        return self.frontier

    def advance(self, end: int | None, rate: Rate | None) -> None:
        """The phase just converted runs from the frontier to `end` at `rate`."""
        if self.frontier is None or end is None or rate is None or end < self.frontier:
            self.frontier = None
            return
        for unit, here in self.at.items():
            per = rate.per_step(unit)
            self.at[unit] = None if here is None or per is None else here + (end - self.frontier) * per
        self.segments.append((self.frontier, end, rate))
        self.frontier = end


def _tiling_problems(phases: Sequence[Bounds], ranges: list[tuple[int | None, int | None]],
                     length: tuple[str, Any, str] | None, n: int | None) -> list[Problem]:
    """First phase at 0, each where the previous ends, the last at the end of the run, each with
    a step. Neighbours in one unit are compared in it, exactly (t within T_EPS); t against steps
    in t; any other pair in steps, once both are converted."""
    if not phases:
        return []
    problems: list[Problem] = []
    first = phases[0]
    if _differs(first.unit, first.start, 0):
        problems.append((first.keys[0], f"leaves a gap: the run starts at {where(first.unit, 0)}", first.start))
    for i in range(1, len(phases)):
        problems += _neighbour_problems(phases[i - 1], phases[i], ranges[i - 1][1], ranges[i][0], n)
    problems += _end_problems(phases[-1], ranges[-1][1], length, n)
    for bounds, (start, end) in zip(phases, ranges, strict=True):
        if bounds.unit in ("tokens", "epoch") and start is not None and end is not None and end <= start:
            problems.append((bounds.keys[1], f"phase {bounds.name!r} [{where(bounds.unit, bounds.start)}, "
                                             f"{where(bounds.unit, bounds.end)}) gets no step: both bounds round up "
                                             f"to step {start}; lengthen the phase", bounds.end))
    return problems


def _differs(unit: str, a: Any, b: Any) -> bool:
    return abs(a - b) > T_EPS if unit == "t" else exact(a) != exact(b)


def _neighbour_problems(prev: Bounds, cur: Bounds, prev_end: int | None, cur_start: int | None,
                        n: int | None) -> list[Problem]:
    key = cur.keys[0]
    if prev.unit == cur.unit or ({prev.unit, cur.unit} == {"t", "step"} and n):
        unit = prev.unit if prev.unit == cur.unit else "t"
        a, b = _in(unit, prev.unit, prev.end, n), _in(unit, cur.unit, cur.start, n)
        eps = T_EPS if unit == "t" else 0
        if b > a + eps:
            return [(key, f"leaves a gap: the previous phase ends at {where(unit, a)}", cur.start)]
        if b < a - eps:
            return [(key, f"overlaps the previous phase, which ends at {where(unit, a)}", cur.start)]
        return []
    if prev_end is None or cur_start is None:
        return []  # checked once both are known in steps
    ends = f"{where(prev.unit, prev.end)}, step {prev_end}"
    if cur_start > prev_end:
        return [(key, f"leaves a gap: the previous phase ends at {ends}; this one starts at step {cur_start}", cur.start)]
    if cur_start < prev_end:
        return [(key, f"overlaps the previous phase, which ends at {ends}; this one starts at step {cur_start}",
                 cur.start)]
    return []


def _in(unit: str, given_unit: str, value: Any, n: int | None) -> Any:
    """`value` (in `given_unit`) in `unit`: itself, or a step as t = step / N."""
    return value / n if unit == "t" and given_unit == "step" else value


def _end_problems(last: Bounds, end: int | None, length: tuple[str, Any, str] | None, n: int | None) -> list[Problem]:
    key = last.keys[1]
    if last.unit == "t":
        return [(key, "the last phase must end at t=1 (end of the run)", last.end)] if abs(last.end - 1.0) > T_EPS else []
    if length is not None and last.unit == length[0]:
        if exact(last.end) != exact(length[1]):
            return [(key, f"the last phase must end at the end of the run, {where(length[0], length[1])} "
                          f"({length[2]})", last.end)]
        return []
    if end is None or n is None or end == n:
        return []
    what = f"{where(length[0], length[1])}, step {n}" if length is not None and length[0] != "step" else f"step {n}"
    return [(key, f"the last phase must end at the end of the run ({what}); it ends at step {end}", last.end)]


# --------------------------------------------------------------------------------------------
# Each phase in every unit (for `stackwise plan`)


def clock_positions(ranges: Sequence[tuple[int, int]], rates: Sequence[Rate]) -> list[dict[str, tuple[Any, Any]]]:
    """For phases running `ranges` of steps at `rates`: each phase's [start, end) in steps, tokens
    and epochs (None when the corpus is unknown), as cumulative positions on the run's clocks."""
    out = []
    tokens, epochs = 0, Fraction(0)
    known = True
    for (first, end), rate in zip(ranges, rates, strict=True):
        per = rate.per_step("epoch")
        known = known and per is not None
        next_tokens = tokens + (end - first) * rate.tokens
        next_epochs = epochs + (end - first) * per if known else None
        out.append({"steps": (first, end), "tokens": (tokens, next_tokens),
                    "epochs": (epochs, next_epochs) if known else None})
        tokens, epochs = next_tokens, next_epochs
    return out
