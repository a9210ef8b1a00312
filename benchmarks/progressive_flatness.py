"""Progressive flatness: the cost of a step as the rack deepens.

For a rack of K = 1, 2, 4, 8 stacks (one block each, d_model 256, seq 256, batch 8, BPE-4096 on
the built-in corpus), on the TrainingMachine:

- progressive: only the top stack (and head) trains; the trunk below is frozen and its output is
  served by the activation cache (measured after one epoch has filled it);
- end to end: all K stacks train.

Each (mode, K) runs in its own worker process so that its peak memory is its own: memory is the
peak RSS during training minus the RSS before the first step, with model and data in place
(so it counts activations, gradients, optimizer state, and for progressive runs the cache).
Workers alternate between modes and repeat `--repeats` times; each reports the median step time
of its measured steps, and the table gives the median over repeats. Model FLOP/s is the run's
analytic training FLOPs (training/flops.py: the cached trunk costs nothing) over the measured
steps' time, and `peak_fraction` its share of this machine's measured fp32 matmul rate
(`common.matmul_peak_flops`).

Run: `.venv/bin/python -m benchmarks.progressive_flatness [--repeats 3 --steps 8]`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time

import torch

from benchmarks.common import current_rss_mb, matmul_peak_flops, median, peak_rss_mb, table, write_results

KS = (1, 2, 4, 8)


def worker_config(mode: str, k: int, tmp: str) -> dict:
    # progressive: the top stack alone trains, its tied embedding (the head's matrix) frozen with the
    # trunk below it, as when the figures were measured (embedding: auto now trains a tied head)
    phase = {"trainable": "last:1", "embedding": "frozen"} if mode == "progressive" else {"trainable": "all"}
    return {
        "model": {"d_model": 256, "n_heads": 8, "max_seq_len": 256, "architecture": {"n_stacks": k, "blocks_per_stack": 1}},
        "training": {"batch_size": 8, "seq_len": 256, "optimizer": {"lr": 3e-4}},
        "data": {"tokenizer": {"kind": "bpe", "vocab_size": 4096}},
        "schedule": [{"name": "main", "start_t": 0.0, "end_t": 1.0, "model_config": phase}],
        "run": {"dir": tmp, "eval_every": 10**9, "log_every": 10**9, "checkpoint_at_transitions": False},
    }


def worker(mode: str, k: int, steps: int) -> dict:
    from stackwise.training import TrainingMachine

    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        machine = TrainingMachine(worker_config(mode, k, tmp), total_steps=10**6, run_dir=False, console=False)
        base_rss = current_rss_mb()  # model and data in place, nothing trained yet
        machine.train_step()
        warm = 2
        if mode == "progressive":  # one epoch fills the cache; later epochs only read it
            warm = -(-machine.data.loader.n_train_windows // 8) + 2
        for _ in range(warm):
            machine.train_step()
        times = []
        flops_before = machine.flops.total
        for _ in range(steps):
            start = time.perf_counter()
            machine.train_step()
            times.append(time.perf_counter() - start)
        cache = machine.cache.cache
        return {
            "mode": mode,
            "k": k,
            "step_s": median(times),
            "model_flops_per_s": (machine.flops.total - flops_before) / sum(times),
            "train_mem_mb": peak_rss_mb() - base_rss,
            "cache_mb": cache.nbytes_ram / 2**20 if cache else 0.0,
            "peak_rss_mb": peak_rss_mb(),
            "cache_on": cache is not None,
            "cache_hit_rate": cache.stats.hit_rate if cache else 0.0,
            "trainable_params": machine.model.num_parameters(trainable_only=True),
        }


def spawn(mode: str, k: int, steps: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.progressive_flatness", "--worker", mode, str(k), "--steps", str(steps)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--worker", nargs=2, metavar=("MODE", "K"))
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), args.steps)))
        return
    peak = matmul_peak_flops()
    runs: list[dict] = []
    for r in range(args.repeats):
        for k in KS:
            order = ("progressive", "end_to_end") if r % 2 == 0 else ("end_to_end", "progressive")
            runs += [spawn(mode, k, args.steps) for mode in order]
    rows = []
    for mode in ("progressive", "end_to_end"):
        for k in KS:
            mine = [x for x in runs if x["mode"] == mode and x["k"] == k]
            rows.append({"mode": mode, "K": k, "step_s": median([x["step_s"] for x in mine]),
                         "train_mem_mb": median([x["train_mem_mb"] for x in mine]),
                         "cache_mb": median([x["cache_mb"] for x in mine]),
                         "trainable": mine[0]["trainable_params"], "cache_hit_rate": median([x["cache_hit_rate"] for x in mine]),
                         "model_gflops_per_s": median([x["model_flops_per_s"] for x in mine]) / 1e9,
                         "peak_fraction": median([x["model_flops_per_s"] for x in mine]) / peak})
    by = {(r["mode"], r["K"]): r for r in rows}
    ratios = {mode: {"time_k8_over_k1": by[(mode, 8)]["step_s"] / by[(mode, 1)]["step_s"],
                     "mem_k8_over_k1": by[(mode, 8)]["train_mem_mb"] / by[(mode, 1)]["train_mem_mb"]}
              for mode in ("progressive", "end_to_end")}
    path = write_results("progressive_flatness", {"repeats": args.repeats, "steps": args.steps,
                                                  "matmul_peak_flops": peak, "rows": rows, "ratios": ratios, "runs": runs})
    print(table(rows))
    for mode, r in ratios.items():
        print(f"{mode}: time(K=8)/time(K=1) = {r['time_k8_over_k1']:.2f}, memory(K=8)/memory(K=1) = {r['mem_k8_over_k1']:.2f}")
    print(f"fp32 matmul peak of this machine: {peak / 1e9:,.1f} GFLOP/s")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
