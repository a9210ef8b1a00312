"""Growth study: does growing a model reach a given validation loss with less training compute
than training the final model from scratch?

Every arm ends (or would end) at the same final model, 4 stacks × 2 blocks, d_model 64, 4 heads,
SwiGLU 176, tied embeddings, vocab 4096 (BPE), seq_len 128, batch 32: 664,640 parameters, the
embedding (262,144) included. Arms, each with one run-wide cosine lr (`over: run`: warmup 5% of the
run to 2e-3, then down to 2e-4 at its end; growth does not restart it) and the same seed-dependent
window order (one order across phases on one corpus, so every arm sees the same windows):

- `scratch`: the final model, all trainable, the whole budget;
- `frozen` (the flagship): 1 → 2 → 3 → 4 stacks at t = 0, .25, .5, .75, each new stack
  identity-initialized and trained alone on a frozen trunk (`trainable: new`); the tied
  embedding/head trains (`embedding: trainable`, what `auto` now does for a tied head: frozen, it
  cost 0.17 bits/byte, see `frozen_head_frozen`), so the backward runs through the trunk (2F per
  trunk block, no weight gradients, no optimizer state);
- `qlora`: the same with the trunk in NF4 learning through LoRA adapters (rank 8, alpha 16);
- `all_trainable`: the same growth, everything trainable;
- `gstack`: 1 stack for the first 25%, then the rack stacked 4 times (G_stack), all trainable;
- `small`: the 1-stack starting model alone for the whole budget (a control);
- `scratch_short`: scratch with its schedule shortened to the total FLOPs of the cheapest growth
  arm at the same budget and seed (measured; it runs after the others);
- `per_phase_lr`: `all_trainable` with a per-phase cosine (each phase warms up 5% of itself and
  decays to 2e-4 on its own: the behaviour before `over: run`); at the smaller budget only,
  with `--full` at both.

Corpus: the interpreter's standard-library `.py` sources (site-packages excluded), one document a
file, in a fixed shuffled order (so the validation windows, read from the split's start, sample the
whole library), written once as a `.jsonl` under benchmarks/.work/growth_study/; BPE 4096,
validation by document hash (5%). One loader prepares tokenizer and shards once, before any arm,
in one cache folder every arm maps.

Measurement: each run in its own process, evaluating 16 times (every 1/16 of the run, and at each
phase end: they coincide) on the first 12 validation batches (49,152 tokens, about a tenth of the
validation split; the same windows every time, so a curve is not noise between evaluations; an
evaluation costs ~4 training steps, 2% of the large budget's time). From the eval records of
metrics.jsonl, per arm and budget, the mean ± half the range over seeds of: val bits/byte at the
end (equal tokens); val bits/byte at equal FLOPs, interpolated linearly in log FLOPs between the
two evaluations around the common point (the total of the cheapest arm at that budget, for every
arm whose curve spans it); the training FLOPs needed to reach the same seed's scratch's final val
bits/byte, interpolated the same way and given as a multiple of scratch's total ("never" if the
curve does not get there); total FLOPs as a multiple of scratch's; wall time (training, without
evaluation) and tokens/s. Evaluation FLOPs are not training FLOPs. Wall times are of runs two at a
time on 2 cores, beside other work: FLOPs, not seconds, are the study's measure of cost.

Sizing (measured on this machine, 2 Xeon cores): the final model trains at ~15,000 tokens/s with
one torch thread and `run.compile` (eager: 12,200 with one thread, 9,800 with two; two threads
with torch's default spinning OpenMP threads drop to 500-1,000 tokens/s while another process
runs, so workers get OMP_WAIT_POLICY=PASSIVE). Hence one thread and compile by default
(`--threads`, `--no-compile`), and as many runs at once as there are cores per thread count
(`--jobs`; 2 here). 20 tokens per parameter (the larger budget) is 13.3M tokens, 3,248 steps
(rounded up to a multiple of the 16 evaluations): ~16 min for scratch; 5 tokens per parameter
(the smaller, a quarter) is 816 steps, ~4 min. The corpus holds 8.85M training tokens, so the
larger budget makes 1.5 passes. Per step, relative to scratch: frozen ~0.7, qlora ~0.9,
all_trainable and per_phase_lr 0.75, gstack 0.9, small 0.5, scratch_short ~0.7, plus ~30 s a run
for start-up, compiling and evaluations. All arms × 2 seeds × 2 budgets would take ~4 hours of
one core per run, not 90 minutes, and no smaller final model is allowed (d_model 64 with BPE 4096
is the floor; the tied embedding alone is 40% of it). The default study therefore runs all 8
arms × 2 seeds at 5 tokens/parameter, and at 20 tokens/parameter `scratch`, `frozen`,
`all_trainable` and `scratch_short` with 2 seeds (the arms the goal is read from), `gstack`,
`small` and `qlora` with seed 0: ~2.4 hours of runs, ~1.3 hours with `--jobs 2`. A smaller budget
(`--budgets 1.25 5 20`) adds the regime where the final model is far too large for its data. `--full` runs every arm × 2 seeds at every budget; `--budgets`, `--arms`,
`--seeds` run exactly what they name, at every budget given.

`--explore` (seed 0, 5 tokens/parameter, ~40 min with `--jobs 2`): when to grow (G_stack at 10%
and 50% beside 25%), the growth factor (×2 at 25% and ×2 at 50% vs ×4 once), a warmup of the new
stacks' lr (`warmup_new`), carried versus fresh optimizer state of the copies
(`grow.optimizer_state: copy`, for G_stack and for stack-by-stack growth by copying the top stack),
a final all-trainable phase after frozen growth, unfreezing the trunk at a tenth of the lr
(`lr_scale`) instead of freezing it, and the frozen flagship with its tied head frozen (the old
`embedding: auto`); scratch, gstack and frozen as references (reused from the main study's runs
when they exist).

Runs live in benchmarks/.work/growth_study/runs/, named by arm, budget, seed and a hash of their
config; a run whose folder holds `study.json` is finished and is not run again, so an interrupted
study picks up where it stopped. Results: benchmarks/results/growth_study.json (every run's eval
curve and the table) and .png (val bits/byte vs training FLOPs); `--explore` writes
growth_study_explore.*, `--quick` writes under benchmarks/results/quick/.

Run: `.venv/bin/python -m benchmarks.growth_study [--quick | --explore | --full] [--write-results-md]`
(`make study`).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import random
import shutil
import subprocess
import sys
import sysconfig
import textwrap
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, machine

ROOT = Path(__file__).resolve().parents[1]
WORK = Path(__file__).resolve().parent / ".work" / "growth_study"
RESULTS_MD = Path(__file__).resolve().parent / "RESULTS.md"

MAIN_ARMS = ("scratch", "frozen", "qlora", "all_trainable", "gstack", "small", "per_phase_lr", "scratch_short")
GROWTH_ARMS = ("frozen", "qlora", "all_trainable", "gstack", "per_phase_lr")  # scratch_short matches the cheapest
EXPLORE_ARMS = ("scratch", "gstack", "frozen", "gstack_at10", "gstack_at50", "gstack_x2x2", "gstack_warmup_new",
                "gstack_copy_state", "copy_copy_state", "frozen_finish", "trunk_low_lr", "frozen_head_frozen")
ALL_ARMS = tuple(dict.fromkeys(MAIN_ARMS + EXPLORE_ARMS))
# The default study (see the docstring's sizing): every arm at the smaller budget; at the larger one the
# arms the goal is read from with 2 seeds, the others with seed 0 only (per_phase_lr not at all).
LARGE_BUDGET_ARMS = ("scratch", "frozen", "all_trainable", "scratch_short", "gstack", "small", "qlora")
ONE_SEED_AT_LARGE = ("gstack", "small", "qlora")
# Training tokens per parameter of the final model: 20 (compute-optimal) and a quarter of it.
BUDGETS = (5.0, 20.0)
EXPLORE_BUDGET = 5.0
IDENTITY = {"n": 1, "where": "append", "init": "identity"}


@dataclass(frozen=True)
class Setup:
    """The final model, the data shape, the lr shape and the measurement."""

    d_model: int = 64
    n_heads: int = 4
    stacks: int = 4
    blocks_per_stack: int = 2
    seq_len: int = 128
    batch_size: int = 32
    tokenizer: dict = field(default_factory=lambda: {"kind": "bpe", "vocab_size": 4096})
    peak_lr: float = 2e-3
    final_lr: float = 2e-4
    warmup: float = 0.05
    evals: int = 16
    eval_batches: int = 12
    threads: int | None = 1  # see the docstring: 1 thread beats 2 on a shared 2-core machine
    compile: bool = True  # run.compile: ~1.5× the tokens/s of eager on this model (measured)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    def steps_for(self, tokens: float) -> int:
        """Steps to see `tokens` tokens, rounded up to a multiple of `evals` (evaluations on whole steps)."""
        steps = math.ceil(tokens / self.tokens_per_step)
        return max(self.evals, math.ceil(steps / self.evals) * self.evals)


# Compiling costs ~10 s a phase: more than the quick runs themselves.
QUICK = Setup(d_model=32, n_heads=2, seq_len=64, batch_size=8, evals=8, eval_batches=4, compile=False)


# ---- the corpus -----------------------------------------------------------------------------------


def stdlib_sources(max_bytes: int | None = None) -> list[Path]:
    """The standard library's .py files (site-/dist-packages left out), sorted; the first ones up
    to `max_bytes` when given (tests)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if not {"site-packages", "dist-packages"} & set(p.relative_to(root).parts) and p.is_file())
    if max_bytes is None:
        return files
    chosen, total = [], 0
    for path in files:
        if total >= max_bytes:
            break
        chosen.append(path)
        total += path.stat().st_size
    return chosen


def write_corpus(path: Path, max_bytes: int | None = None) -> Path:
    """The corpus as .jsonl, one document per source file, in a fixed shuffled order (so the first
    validation windows sample the whole library, not its first folders). Written once: an existing
    file is kept. Undecodable bytes are replaced (a few test files hold deliberate bad encodings)."""
    if path.exists():
        return path
    files = stdlib_sources(max_bytes)
    random.Random(0).shuffle(files)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as out:
        for source in files:
            text = source.read_bytes().decode("utf-8", errors="replace")
            if text.strip():
                out.write(json.dumps({"text": text}) + "\n")
    tmp.replace(path)
    return path


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


# ---- configs ----------------------------------------------------------------------------------------


def lr_shape(setup: Setup, over: str = "run") -> dict:
    return {"schedule": "cosine", "peak": setup.peak_lr, "final": setup.final_lr, "warmup": setup.warmup, "over": over}


def phase(name: str, start: float, end: float, model: dict | None = None, optimizer: dict | None = None) -> dict:
    out: dict[str, Any] = {"name": name, "start_t": start, "end_t": end}
    if model:
        out["model_config"] = model
    if optimizer:
        out["optimizer_config"] = optimizer
    return out


def stack_by_stack(trainable: str, starts: Iterable[float] = (0.25, 0.5, 0.75), end: float = 1.0,
                   **extra: Any) -> list[dict]:
    """1 stack, then one identity stack appended at each start (or as `extra`'s `grow` says):
    `trainable` new or all; `extra`: more settings of the growth phases' model_config."""
    bounds = [0.0, *starts, end]
    phases = [phase("stacks1", bounds[0], bounds[1])]
    for i in range(1, len(bounds) - 1):
        phases.append(phase(f"stacks{i + 1}", bounds[i], bounds[i + 1], {"grow": IDENTITY, "trainable": trainable, **extra}))
    return phases


def gstack(at: float, factors: tuple[int, ...] = (4,), second_at: float = 0.5, state: str = "fresh",
           **optimizer: Any) -> list[dict]:
    """1 stack until `at`, then the rack stacked `factors[0]` times (and `factors[1]` times at
    `second_at`), all trainable, the copies' optimizer state `state` (fresh or copy);
    `optimizer`: settings of the growth phases."""
    starts = [at, second_at][: len(factors)]
    ends = [*starts[1:], 1.0]
    phases = [phase("stacks1", 0.0, at)]
    stacks = 1
    grow_extra = {"optimizer_state": state} if state != "fresh" else {}  # fresh: the configs (hashes) of before
    for start, end, k in zip(starts, ends, factors, strict=True):
        stacks *= k
        phases.append(phase(f"stacks{stacks}", start, end,
                            {"grow": {"init": "stack", "factor": k, **grow_extra}, "trainable": "all"}, optimizer or None))
    return phases


def trunk_low_lr(scale: float = 0.1) -> list[dict]:
    """Stack-by-stack identity growth, all trainable, the stacks below the new one at `scale` × lr."""
    phases = stack_by_stack("all")
    for i, p in enumerate(phases[1:], start=1):
        p["optimizer_config"] = {"lr_scale": {f"rack.stacks.{s}.*": scale for s in range(i)}}
    return phases


def frozen_finish() -> list[dict]:
    """Frozen stack-by-stack growth at 0, .2, .4, .6, then everything trainable for the last 20%."""
    return [*stack_by_stack("new", starts=(0.2, 0.4, 0.6), end=0.8, embedding="trainable"),
            phase("finish", 0.8, 1.0, {"trainable": "all"})]


def arm_plan(arm: str, setup: Setup) -> tuple[int, list[dict] | None, dict]:
    """(starting stacks, schedule, overrides of training.optimizer) of an arm."""
    qlora = {"trunk": "qlora", "lora": {"rank": 8, "alpha": 16}}
    plans: dict[str, tuple[int, list[dict] | None, dict]] = {
        "scratch": (setup.stacks, None, {}),
        "scratch_short": (setup.stacks, None, {}),
        "small": (1, None, {}),
        "frozen": (1, stack_by_stack("new", embedding="trainable"), {}),
        "qlora": (1, stack_by_stack("new", embedding="trainable", **qlora), {}),
        "all_trainable": (1, stack_by_stack("all"), {}),
        "per_phase_lr": (1, stack_by_stack("all"), {"lr": lr_shape(setup, over="phase")}),
        "gstack": (1, gstack(0.25), {}),
        "gstack_at10": (1, gstack(0.10), {}),
        "gstack_at50": (1, gstack(0.50), {}),
        "gstack_x2x2": (1, gstack(0.25, (2, 2), second_at=0.5), {}),
        "gstack_warmup_new": (1, gstack(0.25, warmup_new=0.1), {}),
        "gstack_copy_state": (1, gstack(0.25, state="copy"), {}),
        "copy_copy_state": (1, stack_by_stack("all", grow={"n": 1, "where": "append", "init": "copy",
                                                           "optimizer_state": "copy"}), {}),
        "frozen_finish": (1, frozen_finish(), {}),
        "frozen_head_frozen": (1, stack_by_stack("new", embedding="frozen"), {}),
        "trunk_low_lr": (1, trunk_low_lr(), {}),
    }
    if setup.stacks != 4 and arm not in ("scratch", "scratch_short", "small"):
        raise ValueError(f"arm {arm!r} grows to 4 stacks: the study's final model has 4")
    return plans[arm]


def run_config(setup: Setup, arm: str, steps: int, seed: int, corpus: Path, cache_dir: Path) -> dict:
    """The whole config of one run (run.dir and run.name are set by the runner)."""
    stacks, schedule, optimizer = arm_plan(arm, setup)
    config = {
        "model": {"d_model": setup.d_model, "n_heads": setup.n_heads, "max_seq_len": setup.seq_len,
                  "tie_embeddings": True,
                  "architecture": {"n_stacks": stacks, "blocks_per_stack": setup.blocks_per_stack}},
        "training": {"batch_size": setup.batch_size, "seq_len": setup.seq_len, "total_steps": steps, "seed": seed,
                     "optimizer": {"optimizer_type": "AdamW", "lr": lr_shape(setup), "weight_decay": 0.1, **optimizer}},
        "data": {"paths": [str(corpus)], "tokenizer": dict(setup.tokenizer), "val_fraction": 0.05,
                 "cache_dir": str(cache_dir)},
        "run": {"eval_every": max(1, steps // setup.evals), "eval_batches": setup.eval_batches,
                "log_every": max(1, steps // (4 * setup.evals)), "checkpoint_at_transitions": False,
                "activation_cache": "auto", "cache_ram_mb": 1024},
    }
    if schedule:
        config["schedule"] = schedule
    if setup.threads:
        config["run"]["threads"] = setup.threads
    if setup.compile:
        config["run"]["compile"] = True
    return config


def final_model_params(setup: Setup, vocab_size: int) -> int:
    """Every parameter of the final model (tied embedding counted once)."""
    from stackwise.training.factories import build_model

    cfg = run_config(setup, "scratch", setup.evals, 0, Path("unused"), Path("unused"))
    return build_model(cfg, vocab_size=vocab_size).num_parameters()


# ---- running ------------------------------------------------------------------------------------------


@dataclass
class Run:
    """One training run and, once finished, what it measured."""

    arm: str
    budget: float  # training tokens per parameter of the final model
    seed: int
    steps: int
    config: dict
    run_dir: Path | None = None
    result: dict = field(default_factory=dict)  # process wall time, training wall time
    curve: list[dict] = field(default_factory=list)  # the eval records

    @property
    def total_flops(self) -> float:
        return self.curve[-1]["flops"]

    @property
    def final_bpb(self) -> float:
        return self.curve[-1]["val_bpb"]


def config_hash(config: dict, corpus_digest: str) -> str:
    blob = json.dumps({"config": config, "corpus": corpus_digest}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:10]


def run_name(run: Run, digest: str) -> str:
    return f"{run.arm}-b{run.budget:g}-s{run.seed}-{config_hash(run.config, digest)}"


def worker_env() -> dict[str, str]:
    """Idle OpenMP threads sleep instead of spinning: with spinning threads a training process on
    2 cores another process also uses runs 10-20× slower (measured: ~700 vs ~13,000 tokens/s)."""
    return {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}


def execute(run: Run, runs_dir: Path, digest: str) -> Run:
    """Train `run` in a worker process unless a finished run of the same config is on disk; then
    read its eval curve."""
    run.run_dir = runs_dir / run_name(run, digest)
    done = run.run_dir / "study.json"
    if not done.exists():
        shutil.rmtree(run.run_dir, ignore_errors=True)  # an interrupted run starts over
        started = time.perf_counter()
        cmd = [sys.executable, "-m", "benchmarks.growth_study", "--worker", str(run.run_dir)]
        out = subprocess.run(cmd, input=json.dumps(run.config), capture_output=True, text=True, cwd=ROOT,
                             env=worker_env())
        if out.returncode:
            raise RuntimeError(f"run {run.run_dir.name} failed:\n{out.stderr[-3000:]}")
        result = {**json.loads(out.stdout.strip().splitlines()[-1]), "process_s": time.perf_counter() - started}
        shutil.rmtree(run.run_dir / "checkpoints", ignore_errors=True)  # only the metrics are read
        done.write_text(json.dumps(result) + "\n")
    run.result = json.loads(done.read_text())
    run.curve = read_curve(run.run_dir, run.config)
    return run


def worker(run_dir: str) -> None:
    """Train the config on stdin into `run_dir`; print the training wall time as JSON."""
    from stackwise.training import TrainingMachine

    config = json.loads(sys.stdin.read())
    result = TrainingMachine(config, run_dir=run_dir, console=False).train()
    if result.stopped or result.steps != config["training"]["total_steps"]:  # not finished: never marked done
        sys.exit(f"the run stopped at step {result.steps} ({result.stopped})")
    print(json.dumps({"wall_s": result.wall_time, "tokens": result.tokens_seen, "steps": result.steps}))


def read_curve(run_dir: Path, config: dict) -> list[dict]:
    """The eval records of a run: step, tokens, cumulative training FLOPs, val loss and bits/byte."""
    tokens_per_step = config["training"]["batch_size"] * config["training"]["seq_len"]
    curve = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        if r.get("kind") == "eval":
            curve.append({"step": r["step"], "tokens": r.get("tokens", r["step"] * tokens_per_step),
                          "flops": r["flops"], "val_loss": r["val_loss"], "val_bpb": r["val_bpb"],
                          "wall_s": r.get("wall_s")})
    return curve


def shortened_steps(runs: list[Run], budget: float, seed: int) -> int | None:
    """scratch_short's steps: scratch's FLOPs per step into the cheapest growth arm's total FLOPs
    (at this budget and seed); None without a scratch run or a growth arm to match."""
    scratch = [r for r in runs if r.arm == "scratch" and r.budget == budget and r.seed == seed]
    growth = [r for r in runs if r.arm in GROWTH_ARMS and r.budget == budget and r.seed == seed]
    if not scratch or not growth:
        return None
    per_step = scratch[0].total_flops / scratch[0].steps
    return max(1, round(min(r.total_flops for r in growth) / per_step))


# ---- analysis ------------------------------------------------------------------------------------------


def interpolate_log(x0: float, y0: float, x1: float, y1: float, x: float) -> float:
    """y at x on the line through (log x0, y0) and (log x1, y1)."""
    if x1 == x0:
        return y0
    w = (math.log(x) - math.log(x0)) / (math.log(x1) - math.log(x0))
    return y0 + w * (y1 - y0)


def value_at_flops(curve: list[dict], flops: float) -> float | None:
    """Val bits/byte at `flops` training FLOPs, linear in log FLOPs between the evaluations around
    it; None when the curve does not span it."""
    points = [(c["flops"], c["val_bpb"]) for c in curve if c["flops"] > 0]
    if not points or not points[0][0] <= flops <= points[-1][0]:
        return None
    for (x0, y0), (x1, y1) in itertools.pairwise(points):
        if x0 <= flops <= x1:
            return interpolate_log(x0, y0, x1, y1, flops)
    return points[-1][1]


def flops_to_reach(curve: list[dict], target: float) -> float | None:
    """The training FLOPs at which the curve first reaches val bits/byte ≤ `target`: the log FLOPs
    interpolated linearly between the evaluation before and the first one at or under it (the
    first evaluation itself when it is already there); None when it never does."""
    points = [(c["flops"], c["val_bpb"]) for c in curve if c["flops"] > 0]
    for i, (x1, y1) in enumerate(points):
        if y1 <= target:
            if i == 0 or y1 == target:
                return x1
            x0, y0 = points[i - 1]
            w = (y0 - target) / (y0 - y1)
            return math.exp(math.log(x0) + w * (math.log(x1) - math.log(x0)))
    return None


def spread(values: list[float]) -> tuple[float, float]:
    """(mean, half the range): with 2 seeds, half their difference."""
    return sum(values) / len(values), (max(values) - min(values)) / 2


def fmt(values: list[float | None], digits: int = 3, never: str = "never") -> str:
    """mean ± half the range; `never` where no value; each value where only some seeds have one."""
    present = [v for v in values if v is not None]
    if not present:
        return never if values else "-"
    if len(present) < len(values):
        return " / ".join(never if v is None else f"{v:.{digits}f}" for v in values)
    mean, half = spread(present)
    return f"{mean:.{digits}f}" if len(present) == 1 else f"{mean:.{digits}f} ± {half:.{digits}f}"


def summarize(runs: list[Run]) -> dict[str, Any]:
    """Per budget, the equal-FLOPs point and one row per arm (figures per seed, in seed order)."""
    out: dict[str, Any] = {}
    for budget in sorted({r.budget for r in runs}):
        at_budget = [r for r in runs if r.budget == budget]
        cheapest = min(at_budget, key=lambda r: r.total_flops)
        scratch = {r.seed: r for r in at_budget if r.arm == "scratch"}
        rows = []
        for arm in dict.fromkeys(r.arm for r in at_budget):
            mine = sorted((r for r in at_budget if r.arm == arm), key=lambda r: r.seed)
            rows.append(arm_row(arm, mine, scratch, cheapest.total_flops))
        out[f"{budget:g}"] = {"budget_tokens_per_param": budget, "equal_flops": cheapest.total_flops,
                              "equal_flops_arm": cheapest.arm, "rows": rows}
    return out


def arm_row(arm: str, runs: list[Run], scratch: dict[int, Run], equal_flops: float) -> dict[str, Any]:
    def vs_scratch(run: Run, value: float | None) -> float | None:
        ref = scratch.get(run.seed)
        return None if ref is None or value is None else value / ref.total_flops

    reach = [vs_scratch(r, flops_to_reach(r.curve, scratch[r.seed].final_bpb)) if r.seed in scratch else None
             for r in runs]
    return {
        "arm": arm, "seeds": [r.seed for r in runs], "steps": [r.steps for r in runs],
        "final_bpb": [r.final_bpb for r in runs],
        "bpb_at_equal_flops": [value_at_flops(r.curve, equal_flops) for r in runs],
        "flops_to_scratch_final": reach if scratch else [None] * len(runs),
        "flops_vs_scratch": [vs_scratch(r, r.total_flops) for r in runs],
        "total_flops": [r.total_flops for r in runs],
        "wall_s": [r.result["wall_s"] for r in runs],
        "tokens_per_s": [r.curve[-1]["tokens"] / r.result["wall_s"] for r in runs],
    }


def table_rows(summary: dict[str, Any]) -> list[dict[str, str]]:
    """The report's table as strings, one row per budget and arm."""
    rows = []
    for budget, block in summary.items():
        for r in block["rows"]:
            never = "never" if any(v is not None for v in r["flops_vs_scratch"]) else "-"  # "-": no scratch run
            rows.append({
                "budget (tok/param)": budget, "arm": r["arm"], "seeds": str(len(r["seeds"])),
                "final val bpb": fmt(r["final_bpb"]),
                f"val bpb @ {block['equal_flops']:.2e} FLOPs": fmt(r["bpb_at_equal_flops"], never="-"),
                "FLOPs to scratch's final (×scratch)": fmt(r["flops_to_scratch_final"], 2, never=never),
                "FLOPs (×scratch)": fmt(r["flops_vs_scratch"], 2),
                "wall (s)": fmt(r["wall_s"], 0), "tok/s": fmt(r["tokens_per_s"], 0),
            })
    return rows


def markdown_table(summary: dict[str, Any]) -> str:
    """One Markdown table per budget (the equal-FLOPs column names its own FLOPs)."""
    parts = []
    for budget, block in summary.items():
        rows = table_rows({budget: block})
        keys = [k for k in rows[0] if k != "budget (tok/param)"]
        lines = [f"Budget {budget} tokens/parameter; equal FLOPs = {block['equal_flops']:.3e} "
                 f"(the total of `{block['equal_flops_arm']}`, the cheapest arm).", "",
                 "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        lines += ["| " + " | ".join(r[k] for k in keys) + " |" for r in rows]
        parts.append("\n".join(lines))
    return "\n\n".join(parts)


# ---- outputs --------------------------------------------------------------------------------------------


def plot(runs: list[Run], path: Path) -> Path:
    """Val bits/byte vs training FLOPs (log), one panel per budget, one colour per arm (seeds: solid,
    dashed, dotted), the equal-FLOPs point marked."""
    import matplotlib

    matplotlib.use("Agg")  # files only
    import matplotlib.pyplot as plt

    budgets = sorted({r.budget for r in runs})
    arms = list(dict.fromkeys(r.arm for r in runs))
    colours = {arm: plt.get_cmap("tab10")(i % 10) for i, arm in enumerate(arms)}
    styles = ["-", "--", ":", "-."]
    fig, axes = plt.subplots(1, len(budgets), figsize=(7 * len(budgets), 5), squeeze=False)
    for ax, budget in zip(axes[0], budgets, strict=True):
        labelled = set()
        for r in sorted((r for r in runs if r.budget == budget), key=lambda r: (arms.index(r.arm), r.seed)):
            xs = [c["flops"] for c in r.curve]
            ys = [c["val_bpb"] for c in r.curve]
            label = r.arm if r.arm not in labelled else None
            labelled.add(r.arm)
            ax.plot(xs, ys, styles[r.seed % len(styles)], color=colours[r.arm], label=label, linewidth=1.2)
        equal = min(r.total_flops for r in runs if r.budget == budget)
        ax.axvline(equal, color="grey", linewidth=0.8, linestyle=":", label="equal FLOPs (cheapest arm)")
        ax.set_xscale("log")
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("val bits/byte")
        ax.set_title(f"budget {budget:g} tokens/parameter")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_record(run: Run) -> dict[str, Any]:
    return {"arm": run.arm, "budget_tokens_per_param": run.budget, "seed": run.seed, "steps": run.steps,
            "run_dir": str(run.run_dir), "total_flops": run.total_flops, "final_bpb": run.final_bpb,
            "wall_s": run.result.get("wall_s"), "process_s": run.result.get("process_s"), "curve": run.curve,
            "config": run.config}


def write_outputs(name: str, out_dir: Path, payload: dict[str, Any], runs: list[Run]) -> tuple[Path, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{name}.json"
    body = {"benchmark": name, "machine": machine(), **payload, "runs": [run_record(r) for r in runs]}
    json_path.write_text(json.dumps(body, indent=2) + "\n")
    return json_path, plot(runs, out_dir / f"{name}.png")


def replace_section(text: str, heading: str, body: str) -> str:
    """`text` with the section under `heading` (up to the next `## ` heading) replaced by `body`,
    or appended when absent."""
    lines = text.splitlines()
    section = [heading, "", *body.strip().splitlines(), ""]
    if heading in lines:
        start = lines.index(heading)
        end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
        lines[start:end] = section
    else:
        lines += ["", *section] if lines and lines[-1].strip() else section
    return "\n".join(lines).rstrip("\n") + "\n"


def results_md_section(payload: dict[str, Any], table: str) -> str:
    setup, corpus = payload["setup"], payload["corpus"]
    run_minutes = sum(r["process_s"] for r in payload["run_times"]) / 60
    intro = (
        f"`{payload['command']}`: {len(payload['run_times'])} run(s), {run_minutes:.0f} min of training processes "
        f"({setup['threads'] or 'default'} torch thread(s), run.compile {'on' if setup['compile'] else 'off'}). "
        f"Final model {setup['stacks']} stacks × {setup['blocks_per_stack']} blocks, d_model {setup['d_model']}, "
        f"tied embeddings, {payload['params']:,} parameters; corpus: the standard library's .py files "
        f"({corpus['train_tokens']:,} training tokens, BPE {setup['tokenizer'].get('vocab_size', '')}); seq_len "
        f"{setup['seq_len']}, batch {setup['batch_size']}, run-wide cosine lr {setup['peak_lr']:g} → "
        f"{setup['final_lr']:g}. Figures: mean ± half the range over seeds; equal FLOPs and FLOPs-to-reach "
        "interpolated linearly in log FLOPs along the eval curves (benchmarks/growth_study.py; curves in "
        f"`benchmarks/results/{payload['name']}.json` and `.png`)."
    )
    plot_line = f"![val bits/byte vs training FLOPs, every arm and seed](results/{payload['name']}.png)"
    return f"{textwrap.fill(intro, 100, break_on_hyphens=False)}\n\n{table}\n\n{plot_line}\n"


# ---- the study ------------------------------------------------------------------------------------------


@dataclass
class Plan:
    setup: Setup
    arms_by_budget: dict[float, tuple[str, ...]]
    seeds_by_budget: dict[float, tuple[int, ...]]
    work: Path
    corpus_bytes: int | None = None  # tests: the first files of the library only
    jobs: int = 1  # runs trained at once
    one_seed: dict[float, tuple[str, ...]] = field(default_factory=dict)  # arms run with the first seed only

    def seeds_for(self, budget: float, arm: str) -> tuple[int, ...]:
        seeds = self.seeds_by_budget[budget]
        return seeds[:1] if arm in self.one_seed.get(budget, ()) else seeds


def prepare(plan: Plan) -> tuple[Path, Path, str, dict[str, Any]]:
    """The corpus, its tokenizer and token shards, once: (corpus, cache dir, corpus digest, stats)."""
    from stackwise.training import ProgressiveDataLoader

    suffix = "" if plan.corpus_bytes is None else f"-{plan.corpus_bytes}"
    corpus = write_corpus(plan.work / f"stdlib{suffix}.jsonl", plan.corpus_bytes)
    cache_dir = plan.work / "cache"
    loader = ProgressiveDataLoader(run_config(plan.setup, "scratch", plan.setup.evals, 0, corpus, cache_dir))
    splits = loader.prepared_streams()[0]
    coverage = loader.validation_coverage(plan.setup.eval_batches)
    stats = {"path": str(corpus), "documents": splits.train_docs + splits.val_docs, "train_tokens": len(splits.train),
             "val_tokens": len(splits.val), "train_bytes": splits.train_bytes, "val_bytes": splits.val_bytes,
             "vocab_size": loader.tokenizer.vocab_size, "eval_bytes": coverage.get("bytes"),
             "eval_documents": coverage.get("documents")}
    return corpus, cache_dir, file_digest(corpus), stats


def run_plan(plan: Plan, log: Any = print) -> tuple[list[Run], dict[str, Any]]:
    """Every run of the plan (scratch_short last at each budget and seed); (runs, facts)."""
    corpus, cache_dir, digest, stats = prepare(plan)
    params = final_model_params(plan.setup, stats["vocab_size"])
    log(f"final model: {params:,} parameters; corpus: {stats['train_tokens']:,} training tokens, "
        f"{stats['val_tokens']:,} validation tokens ({stats['documents']:,} documents)")
    runs_dir = plan.work / "runs"
    runs: list[Run] = []

    def train(batch: list[Run]) -> None:
        # Independent runs, `plan.jobs` at a time (each worker uses `setup.threads` threads).
        with ThreadPoolExecutor(max_workers=plan.jobs) as pool:
            for run in pool.map(lambda r: execute(r, runs_dir, digest), batch):
                runs.append(run)
                log(f"{run.arm:>18} budget {run.budget:g} seed {run.seed}: {run.steps} steps, final val bpb "
                    f"{run.final_bpb:.4f}, {run.total_flops:.3e} FLOPs, {run.result['wall_s']:.0f} s training "
                    f"({run.result['process_s']:.0f} s process)")

    for budget in sorted(plan.arms_by_budget):
        steps = plan.setup.steps_for(budget * params)
        arms = plan.arms_by_budget[budget]
        # the arms with every seed first, then those with one (the first to leave out when time is short)
        order = sorted((arm for arm in arms if arm != "scratch_short"), key=lambda a: a in plan.one_seed.get(budget, ()))
        train([Run(arm, budget, seed, steps, run_config(plan.setup, arm, steps, seed, corpus, cache_dir))
               for arm in order for seed in plan.seeds_for(budget, arm)])
        short = []  # scratch_short: after the arms whose FLOPs it matches
        for seed in plan.seeds_for(budget, "scratch_short") if "scratch_short" in arms else ():
            arm_steps = shortened_steps(runs, budget, seed)
            if arm_steps is None:
                log(f"scratch_short at budget {budget:g}, seed {seed}: skipped (needs scratch and a growth arm)")
                continue
            config = run_config(plan.setup, "scratch_short", arm_steps, seed, corpus, cache_dir)
            short.append(Run("scratch_short", budget, seed, arm_steps, config))
        train(short)
    return runs, {"params": params, "corpus": stats, "corpus_digest": digest}


def study(plan: Plan, name: str, out_dir: Path, command: str, log: Any = print) -> tuple[dict[str, Any], str]:
    """Run the plan, write JSON and PNG under `out_dir`; (payload, Markdown table)."""
    started = time.perf_counter()
    runs, facts = run_plan(plan, log)
    summary = summarize(runs)
    table = markdown_table(summary)
    payload = {"name": name, "command": command, "setup": asdict(plan.setup), **facts,
               "budgets": {f"{b:g}": {"tokens": plan.setup.steps_for(b * facts["params"]) * plan.setup.tokens_per_step,
                                      "arms": list(plan.arms_by_budget[b]), "seeds": list(plan.seeds_by_budget[b]),
                                      "one_seed_arms": list(plan.one_seed.get(b, ()))}
                           for b in sorted(plan.arms_by_budget)},
               "interpolation": "linear in log FLOPs between neighbouring evaluations",
               "spread": "half the range over seeds", "summary": summary, "table": table_rows(summary),
               "run_times": [{"arm": r.arm, "budget": r.budget, "seed": r.seed, **r.result} for r in runs],
               "wall_s": time.perf_counter() - started}
    json_path, png_path = write_outputs(name, out_dir, payload, runs)
    log(table)
    log(f"results: {json_path}, {png_path}")
    return payload, table


def build_plan(args: argparse.Namespace) -> tuple[Plan, str, Path]:
    """The plan, result name and output folder the options ask for."""
    setup = QUICK if args.quick else Setup()
    setup = replace(setup, d_model=args.d_model or setup.d_model, threads=args.threads or setup.threads,
                    compile=setup.compile and not args.no_compile)
    work = Path(args.work) if args.work else WORK
    default_budgets = [0.05, 0.2] if args.quick else list(BUDGETS)
    if args.explore:
        budget = min(args.budgets) if args.budgets else (0.05 if args.quick else EXPLORE_BUDGET)
        budgets, arms, seeds = [budget], args.arms or list(EXPLORE_ARMS), args.seeds or [0]
        name = "growth_study_explore"
    else:
        budgets, arms, seeds = args.budgets or default_budgets, args.arms or list(MAIN_ARMS), args.seeds or [0, 1]
        name = "growth_study"
    arms_by_budget = {b: tuple(arms) for b in budgets}
    seeds_by_budget = {b: tuple(seeds) for b in budgets}
    one_seed = {}
    if not (args.quick or args.explore or args.full or args.arms or args.seeds or args.budgets):
        big = max(budgets)  # the default study: see the docstring's sizing
        arms_by_budget[big], one_seed[big] = LARGE_BUDGET_ARMS, ONE_SEED_AT_LARGE
    if args.quick:
        seeds_by_budget = {b: (seeds[0],) if not args.seeds else tuple(seeds) for b in budgets}
    out_dir = RESULTS_DIR / "quick" if args.quick else RESULTS_DIR
    jobs = args.jobs or max(1, (os.cpu_count() or 1) // setup.threads)
    return Plan(setup, arms_by_budget, seeds_by_budget, work, jobs=jobs, one_seed=one_seed), name, out_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budgets", type=float, nargs="+", help="training tokens per parameter of the final model "
                        "(default 5 20; --quick 0.05 0.2; --explore 5, or the smallest given)")
    parser.add_argument("--seeds", type=int, nargs="+", help="training.seed values (default 0 1; --quick and --explore 0)")
    parser.add_argument("--arms", nargs="+", choices=ALL_ARMS, help="default: the main arms (--explore: its recipes)")
    parser.add_argument("--d-model", type=int, help="width of every arm's model (default 64; --quick 32)")
    parser.add_argument("--threads", type=int, help="torch threads per run (default 1: see above)")
    parser.add_argument("--jobs", type=int, help="runs trained at once (default: cores / threads)")
    parser.add_argument("--no-compile", action="store_true", help="eager runs (default: run.compile, except --quick)")
    parser.add_argument("--quick", action="store_true", help="smoke test: tiny model and budgets, 1 seed, all arms")
    parser.add_argument("--explore", action="store_true", help="recipes: extra arms, 1 seed, the smaller budget")
    parser.add_argument("--full", action="store_true", help="every main arm at every budget with 2 seeds (~4 h)")
    parser.add_argument("--work", help=f"runs, corpus and token cache (default {WORK.relative_to(ROOT)})")
    parser.add_argument("--write-results-md", action="store_true",
                        help="replace (or add) this study's section of benchmarks/RESULTS.md")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick and args.write_results_md:
        parser.error("--write-results-md: --quick figures are a smoke test, not results")
    if args.worker:
        worker(args.worker)
        return
    plan, name, out_dir = build_plan(args)
    command = "python -m benchmarks.growth_study " + " ".join(sys.argv[1:])
    payload, table = study(plan, name, out_dir, command.strip())
    if args.write_results_md:
        heading = "## Growth study: recipes (`--explore`)" if args.explore else "## Growth study"
        text = RESULTS_MD.read_text() if RESULTS_MD.exists() else "# Benchmark results\n"
        RESULTS_MD.write_text(replace_section(text, heading, results_md_section(payload, table)))
        print(f"wrote the section {heading!r} of {RESULTS_MD}")


if __name__ == "__main__":
    main()
