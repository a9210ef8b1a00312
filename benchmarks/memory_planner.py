"""Memory planner accuracy: `stackwise plan`'s estimate vs the measured peak, for 10 configs.

Each config runs in its own worker process on the TrainingMachine. The worker enters the phase
(growth, freezing, NF4, adapters, optimizer), then resets the kernel's peak-RSS mark
(`/proc/self/clear_refs`), trains (for cached runs, one full epoch so the cache is complete, then
a few steps more) and reports peak RSS minus the RSS before the first step: what training adds on
top of the resident weights. The estimate compared is the planner's CPU peak minus its weights.

Run: `.venv/bin/python -m benchmarks.memory_planner`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile

from benchmarks.common import current_rss_mb, median, peak_rss_mb, reset_peak_rss, table, write_results

BASE = {
    "model": {"d_model": 256, "n_heads": 8, "max_seq_len": 256, "architecture": {"n_stacks": 2, "blocks_per_stack": 2}},
    "training": {"batch_size": 8, "seq_len": 256, "optimizer": {"lr": 3e-4}},
    "data": {"tokenizer": {"kind": "bpe", "vocab_size": 4096}},
    "run": {"eval_every": 10**9, "log_every": 10**9, "checkpoint_at_transitions": False},
}


def _config(model=None, training=None, data=None, run=None, phase=None) -> dict:
    cfg = json.loads(json.dumps(BASE))
    for section, extra in (("model", model), ("training", training), ("data", data), ("run", run)):
        cfg[section].update(extra or {})
    cfg["schedule"] = [{"name": "main", "start_t": 0.0, "end_t": 1.0, "model_config": phase or {}}]
    return cfg


FOUR = {"architecture": {"n_stacks": 4, "blocks_per_stack": 1}}
# The top stack alone trains: the tied embedding (the head's matrix) is frozen with the trunk, as
# when these rows were measured (embedding: auto now trains a tied embedding with its head).
TOP = {"embedding": "frozen"}
CONFIGS = {
    "e2e d128 4 blocks": _config(model={"d_model": 128, "n_heads": 4}, training={"batch_size": 16, "seq_len": 128}),
    "e2e d256 4 blocks": _config(),
    "e2e d256 8 blocks seq 512": _config(model={"max_seq_len": 512, "architecture": {"n_stacks": 4, "blocks_per_stack": 2}},
                                         training={"seq_len": 512, "batch_size": 4}),
    "e2e mla": _config(model={"attention": "mla", "mla": {"kv_rank": 64}}),
    "e2e gqa mlm": _config(model={"n_kv_heads": 2}, data={"objective": "mlm"}),
    "e2e diffusion": _config(data={"objective": "diffusion"}),
    "top stack, frozen trunk, no cache": _config(model=FOUR, phase={**TOP, "trainable": "last:1"},
                                                 run={"activation_cache": False}),
    "top stack, frozen trunk, cache": _config(model=FOUR, phase={**TOP, "trainable": "last:1"}),
    "top stack, NF4 trunk, cache": _config(model=FOUR, phase={**TOP, "trainable": "last:1", "trunk_precision": "nf4"}),
    "top stack, QLoRA trunk": _config(model=FOUR, phase={**TOP, "trainable": "last:1", "trunk": "qlora"}),
}


def worker(name: str, steps: int) -> dict:
    import gc

    from stackwise.cli.plan import plan_rows
    from stackwise.config import StackWiseConfig
    from stackwise.training import TrainingMachine

    with tempfile.TemporaryDirectory() as tmp:
        config = StackWiseConfig.from_dict({**CONFIGS[name], "run": {**CONFIGS[name]["run"], "dir": tmp}})
        machine = TrainingMachine(config, total_steps=10**6, run_dir=False, console=False)
        machine.planes  # noqa: B018 - enter the phase: structure, precision, optimizer
        windows = machine.data.loader.n_train_windows
        estimate = plan_rows(config, 10**6, device="cpu", windows=lambda seq_len: windows)[0]["memory"]
        gc.collect()
        baseline = current_rss_mb()
        reset_peak_rss()
        n = steps + (-(-windows // config.training.batch_size) if machine.cache.active else 0)
        for _ in range(n):
            machine.train_step()
        measured = (peak_rss_mb() - baseline) * 2**20
    predicted = estimate.host_total - estimate.weights
    return {"config": name, "measured_mb": measured / 2**20, "estimated_mb": predicted / 2**20,
            "error": predicted / measured - 1, "breakdown_mb": {k: v / 2**20 for k, v in estimate.to_dict().items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3, help="runs per config; the median is reported")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--worker")
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.steps)))
        return
    rows = []
    for name in CONFIGS:
        runs = []
        for _ in range(args.repeats):
            out = subprocess.run([sys.executable, "-m", "benchmarks.memory_planner", "--worker", name, "--steps", str(args.steps)],
                                 capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
        measured = median([r["measured_mb"] for r in runs])
        rows.append({"config": name, "measured_mb": measured, "estimated_mb": runs[0]["estimated_mb"],
                     "error_pct": 100 * (runs[0]["estimated_mb"] / measured - 1), "breakdown_mb": runs[0]["breakdown_mb"]})
    within = sum(abs(r["error_pct"]) <= 15 for r in rows)
    path = write_results("memory_planner", {"rows": rows, "within_15pct": within, "configs": len(rows)})
    print(table([{k: v for k, v in r.items() if k != "breakdown_mb"} for r in rows]))
    print(f"{within}/{len(rows)} estimates within 15% of the measured peak; results: {path}")


if __name__ == "__main__":
    main()
