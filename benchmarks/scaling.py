"""Scaling: how the cost of a TrainingMachine step grows as d_model, depth and seq_len double.

Base: d_model 256 (8 heads, SwiGLU 8/3·d), 4 blocks (2 stacks × 2), seq 256, batch 8, vocab 4096
(BPE-4096 on the built-in corpus), untied embeddings, fp32, AdamW. From it, one axis at a time:

- d_model 128 → 256 → 512  (SwiGLU width follows: 352, 688, 1376; head_dim 16, 32, 64)
- depth   2 → 4 → 8 blocks (1, 2, 4 stacks of 2 blocks)
- seq_len 128 → 256 → 512  (tokens per step double too)

Each point runs in its own fresh worker process, so its memory is its own: the worker builds the
machine (data and model in place), notes its RSS, trains `--warmup` untimed steps and then
`--steps` timed ones, and reports the median step time and its peak RSS (VmHWM; see
benchmarks.common.peak_rss_mb) minus the RSS before training: what training adds (activations,
gradients, optimizer state). Workers run `--repeats` rounds, the order of points reversed every
other round; the table gives the median over rounds and each point's cost relative to the base
(×base: step time, tokens/s, training memory, parameters), so a reader sees how cost grows.

Run: `.venv/bin/python -m benchmarks.scaling [--repeats 3 --steps 5 --warmup 2]`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

from benchmarks.common import current_rss_mb, median, peak_rss_mb, table, write_results

BASE = {"d_model": 256, "blocks": 4, "seq_len": 256}
BATCH, VOCAB = 8, 4096
POINTS = {  # name: (axis, overrides of the base)
    "base": ("base", {}),
    "d_model 128": ("d_model", {"d_model": 128}),
    "d_model 512": ("d_model", {"d_model": 512}),
    "2 blocks": ("depth", {"blocks": 2}),
    "8 blocks": ("depth", {"blocks": 8}),
    "seq 128": ("seq_len", {"seq_len": 128}),
    "seq 512": ("seq_len", {"seq_len": 512}),
}
ROW_ORDER = ("d_model 128", "base", "d_model 512", "2 blocks", "base", "8 blocks", "seq 128", "base", "seq 512")


def point_config(name: str, cache_dir: str) -> dict:
    p = {**BASE, **POINTS[name][1]}
    return {
        "model": {"vocab_size": VOCAB, "d_model": p["d_model"], "n_heads": 8, "max_seq_len": p["seq_len"],
                  "tie_embeddings": False, "architecture": {"n_stacks": p["blocks"] // 2, "blocks_per_stack": 2}},
        "training": {"batch_size": BATCH, "seq_len": p["seq_len"],
                     "optimizer": {"optimizer_type": "AdamW", "lr": 3e-4, "weight_decay": 0.1}},
        "data": {"tokenizer": {"kind": "bpe", "vocab_size": VOCAB}, "cache_dir": cache_dir},
        "run": {"eval_every": 10**9, "log_every": 10, "checkpoint_at_transitions": False},
    }


def worker(name: str, steps: int, warmup: int, cache_dir: str) -> dict:
    import torch

    from stackwise.training import TrainingMachine

    torch.manual_seed(0)
    config = point_config(name, cache_dir)
    machine = TrainingMachine(config, total_steps=warmup + steps, run_dir=False, console=False)
    before = current_rss_mb()
    for _ in range(warmup):
        machine.train_step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        machine.train_step()
        times.append(time.perf_counter() - start)
    peak = peak_rss_mb()
    seq = config["training"]["seq_len"]
    return {"point": name, "step_s": median(times), "tokens_per_s": BATCH * seq / median(times),
            "rss_before_mb": before, "peak_rss_mb": peak, "train_mem_mb": peak - before,
            "params": machine.model.num_parameters(), "step_times": times}


def spawn(name: str, steps: int, warmup: int, cache_dir: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.scaling", "--worker", name, "--steps", str(steps),
           "--warmup", str(warmup), "--cache-dir", cache_dir]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"worker {name!r} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3, help="rounds of one worker per point (median over them)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per worker (median over them)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per worker first")
    parser.add_argument("--worker", choices=list(POINTS), help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps, args.warmup, args.cache_dir)))
        return
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as cache_dir:
        from stackwise.training import ProgressiveDataLoader

        ProgressiveDataLoader(point_config("base", cache_dir))  # tokenizer and token cache once, outside the workers
        runs: list[dict] = []
        names = list(POINTS)
        for r in range(args.repeats):
            for name in names if r % 2 == 0 else names[::-1]:
                runs.append(spawn(name, args.steps, args.warmup, cache_dir))
    med = {name: {k: median([x[k] for x in runs if x["point"] == name])
                  for k in ("step_s", "tokens_per_s", "train_mem_mb", "peak_rss_mb", "rss_before_mb")}
           for name in POINTS}
    params = {x["point"]: x["params"] for x in runs}
    base = med["base"]
    rows = []
    for name in ROW_ORDER:
        axis = POINTS[name][0]
        m = med[name]
        rows.append({"axis": axis if name != "base" else "(base)", "point": name, "params": params[name],
                     "step_s": m["step_s"], "tok/s": m["tokens_per_s"], "train MB": m["train_mem_mb"],
                     "peak RSS MB": m["peak_rss_mb"], "×base step": m["step_s"] / base["step_s"],
                     "×base tok/s": m["tokens_per_s"] / base["tokens_per_s"],
                     "×base train MB": m["train_mem_mb"] / base["train_mem_mb"],
                     "×base params": params[name] / params["base"]})
    growth = {axis: {"step_time_x4": med[hi]["step_s"] / med[lo]["step_s"],
                     "train_mem_x4": med[hi]["train_mem_mb"] / med[lo]["train_mem_mb"]}
              for axis, lo, hi in (("d_model", "d_model 128", "d_model 512"), ("depth", "2 blocks", "8 blocks"),
                                   ("seq_len", "seq 128", "seq 512"))}
    path = write_results("scaling", {"base": {**BASE, "batch_size": BATCH, "vocab": VOCAB}, "repeats": args.repeats,
                                     "steps": args.steps, "warmup": args.warmup, "rows": rows, "medians": med,
                                     "growth_over_4x": growth, "runs": runs, "wall_s": time.perf_counter() - started})
    print(table(rows))
    for axis, g in growth.items():
        print(f"{axis} ×4 (lowest → highest point): step time ×{g['step_time_x4']:.2f}, training memory ×{g['train_mem_x4']:.2f}")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
