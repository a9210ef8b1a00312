"""Step time of one process vs torchrun with 2 ranks (DDP, FSDP2), same global batch.

The reference shape (vocab 4096, d_model 256, 4 blocks, 8 heads, SwiGLU 688, seq 256, global
batch 8, fp32, AdamW) trained for `--steps` steps by `stackwise train`; each step's time comes
from metrics.jsonl (global tokens / tokens per second), the first `--skip` steps dropped, median
per run, then the median over `--repeats` runs taken in alternation. On a 2-core CPU the ranks
share the cores (torchrun gives each one thread), so this measures the cost of the distributed
machinery, not a speed-up: the figures say what correctness runs here cost.

Run: `.venv/bin/python -m benchmarks.distributed_step [--repeats 3 --steps 12]`
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from benchmarks.common import machine, median, table, write_results

CONFIG = {
    "model": {"vocab_size": 4096, "d_model": 256, "n_heads": 8, "ffn_hidden": 688, "max_seq_len": 256,
              "tie_embeddings": False, "architecture": {"n_stacks": 4, "blocks_per_stack": 1}},
    "training": {"batch_size": 8, "seq_len": 256, "seed": 0,
                 "optimizer": {"optimizer_type": "AdamW", "lr": 3e-4}},
    "data": {"tokenizer": {"kind": "bpe", "vocab_size": 4096}},
    "run": {"device": "cpu", "log_every": 1, "eval_every": 100000, "eval_batches": 1},
}
MODES = ("single", "ddp", "fsdp")


def run(mode: str, steps: int, work: Path, index: int) -> dict:
    cfg = work / "config.yaml"
    name = f"{mode}-{index}"
    args = ["-m", "stackwise", "train", str(cfg), f"training.total_steps={steps}", f"run.dir={work}", f"run.name={name}"]
    if mode == "single":
        cmd = [sys.executable, *args]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               *args, f"run.distributed={mode}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"} if mode != "single" else dict(os.environ)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise SystemExit(f"{mode} failed:\n{proc.stderr[-4000:]}")
    records = [json.loads(line) for line in (work / name / "metrics.jsonl").read_text().splitlines()]
    steps_ = [r for r in records if r["kind"] == "step"]
    tokens = CONFIG["training"]["batch_size"] * CONFIG["training"]["seq_len"]
    times = [tokens / r["tokens_per_s"] for r in steps_]
    return {"step_s": times, "peak_mem_mb": max(r["peak_mem_mb"] for r in steps_), "losses": [r["loss"] for r in steps_]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--skip", type=int, default=2, help="first steps left out (warm-up)")
    args = parser.parse_args()
    per_mode: dict[str, list[float]] = {m: [] for m in MODES}
    memory: dict[str, list[float]] = {m: [] for m in MODES}
    first_losses: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        (work / "config.yaml").write_text(yaml.safe_dump(CONFIG))
        for i in range(args.repeats):
            for mode in MODES:  # alternating, so drift hits every mode alike
                out = run(mode, args.steps, work, i)
                per_mode[mode].append(median(out["step_s"][args.skip:]))
                memory[mode].append(out["peak_mem_mb"])
                first_losses.setdefault(mode, out["losses"])
    base = median(per_mode["single"])
    rows = []
    for mode in MODES:
        step = median(per_mode[mode])
        rows.append({
            "mode": mode, "processes": 1 if mode == "single" else 2,
            "median step s": round(step, 4), "spread": f"{min(per_mode[mode]):.3f}–{max(per_mode[mode]):.3f}",
            "tok/s (global)": round(CONFIG["training"]["batch_size"] * CONFIG["training"]["seq_len"] / step),
            "vs single": round(base / step, 3), "peak RSS/process MB": round(median(memory[mode])),
            "max |loss - single|": round(max(abs(a - b) for a, b in zip(first_losses[mode], first_losses["single"], strict=True)), 7),
        })
    print(table(rows))
    path = write_results("distributed_step", {
        "benchmark": "distributed_step", "machine": machine(), "config": CONFIG,
        "repeats": args.repeats, "steps": args.steps, "skip": args.skip, "rows": rows,
        "per_run_median_step_s": per_mode,
    })
    print(f"results: {path}")


if __name__ == "__main__":
    main()
