"""Run every benchmark, one after another, each in its own process; then write a summary.

Run: `.venv/bin/python -m benchmarks.run_all [--quick] [--only NAME ...]` (`make bench` runs it
without options). Each benchmark module that exists in benchmarks/ runs with its default
arguments, prints its table and writes benchmarks/results/NAME.json; this script then gathers the
headline figures of all of them into benchmarks/results/summary.json.

`--quick` is a smoke test: reduced arguments (a minute or two in all), run on a copy of the
benchmarks in a temporary folder so that its noisy figures never overwrite the real results; its
JSON files, summary included, land in benchmarks/results/quick/.

The default suite takes about 16 minutes on 2 quiet CPU cores (benchmarks/README.md).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, machine

BENCH_DIR = Path(__file__).resolve().parent

# name: arguments for --quick (the default run passes none: each module's defaults).
BENCHMARKS: dict[str, list[str]] = {
    "data_tokenize": ["--repeats", "2"],
    "data_ingest": ["--sizes", "2", "4", "--ratio-size", "2", "--repeats", "1"],
    "engine_overhead": ["--blocks", "2", "--steps", "3", "--warmup", "1"],
    "hot_path": ["--blocks", "2", "--steps", "2"],
    "progressive_flatness": ["--repeats", "1", "--steps", "2"],
    "memory_planner": ["--repeats", "1"],
    "hf_compare": ["--blocks", "2", "--steps", "2", "--warmup", "1", "--trainer-warmup", "1",
                   "--mem-repeats", "1", "--mem-steps", "3"],
    "scaling": ["--repeats", "1", "--steps", "2", "--warmup", "1"],
    "distributed_step": ["--repeats", "1", "--steps", "4", "--skip", "1"],
    "generation": ["--rounds", "1", "--new-tokens", "16"],
}


def _get(d: dict, *keys: str) -> Any:
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def headline(name: str, r: dict) -> dict[str, Any]:
    """The figures a reader looks at first, per benchmark."""
    if name == "data_tokenize":
        starts = {s["tokenizer"]: s["cold_s"] / s["warm_s"] for s in r.get("loader_start", [])}
        return {"bpe_encode_mb_per_s": _get(r, "bpe_4096_builtin", "encode_mb_per_s"),
                "bpe_train_s": _get(r, "bpe_4096_builtin", "train_s"), "loader_start_cold_over_warm": starts}
    if name == "data_ingest":
        return r.get("goals", {})
    if name == "engine_overhead":
        return {"machine_over_hand_tokens_per_s": r.get("ratio_machine_over_hand"),
                "per_block_median": r.get("ratio_per_block_median"), "median_tokens_per_s": r.get("median_tokens_per_s")}
    if name == "hot_path":
        return {"speedup": {row["variant"]: row["speedup"] for row in r.get("rows", [])}}
    if name == "progressive_flatness":
        return {"ratios": r.get("ratios")}
    if name == "hf_compare":
        return {"ratios_ours_over_hf": r.get("ratios"), "median_tokens_per_s": r.get("median_tokens_per_s"),
                "peak_rss_mb": {k: v["peak_rss_mb"] for k, v in (r.get("memory_medians") or {}).items()},
                "params": r.get("params")}
    if name == "scaling":
        return {"growth_over_4x": r.get("growth_over_4x"),
                "relative_to_base": {row["point"]: {k: row[k] for k in row if k.startswith("×base")}
                                     for row in r.get("rows", []) if row["point"] != "base"}}
    if name == "generation":
        return {"cached_over_uncached": {row["model"]: row["speedup"] for row in r.get("rows", [])},
                "same_ids": all(row["same_ids"] for row in r.get("rows", []))}
    if name == "distributed_step":
        return {row["mode"]: {"median_step_s": row["median step s"], "vs_single": row["vs single"]} for row in r.get("rows", [])}
    # A benchmark this script does not know yet: its top-level scalars and anything named *ratio*.
    return {k: v for k, v in r.items()
            if (isinstance(v, (int, float, bool)) and k not in ("repeats", "steps")) or "ratio" in k}


def run_one(name: str, args: list[str], cwd: Path) -> tuple[int, float]:
    cmd = [sys.executable, "-m", f"benchmarks.{name}", *args]
    print(f"\n=== {name}: {' '.join(cmd[1:])}", flush=True)
    start = time.perf_counter()
    code = subprocess.run(cmd, cwd=cwd).returncode  # its table prints straight through
    seconds = time.perf_counter() - start
    print(f"=== {name}: {'ok' if code == 0 else f'FAILED (exit {code})'} in {seconds:.0f} s", flush=True)
    return code, seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="reduced arguments; results go to results/quick/")
    parser.add_argument("--only", nargs="+", metavar="NAME", help="run only these benchmarks")
    args = parser.parse_args()
    present = [n for n in BENCHMARKS if (BENCH_DIR / f"{n}.py").exists()]
    missing = sorted(set(args.only or []) - set(present))
    if missing:
        raise SystemExit(f"no such benchmark: {', '.join(missing)} (known and present: {', '.join(present)})")
    names = [n for n in present if not args.only or n in args.only]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick:  # a copy of the package, so its results/ is a scratch folder
            cwd = Path(tmp)
            shutil.copytree(BENCH_DIR, cwd / "benchmarks", ignore=shutil.ignore_patterns("results", "__pycache__"))
            results_in, results_out = cwd / "benchmarks" / "results", RESULTS_DIR / "quick"
        else:
            cwd, results_in, results_out = BENCH_DIR.parent, RESULTS_DIR, RESULTS_DIR
        summary: dict[str, Any] = {}
        for name in names:
            code, seconds = run_one(name, BENCHMARKS[name] if args.quick else [], cwd)
            entry: dict[str, Any] = {"ok": code == 0, "wall_s": round(seconds, 1)}
            path = results_in / f"{name}.json"
            if code == 0 and path.exists():
                entry.update(headline(name, json.loads(path.read_text())))
                if results_in != results_out:
                    results_out.mkdir(parents=True, exist_ok=True)
                    shutil.copy(path, results_out / path.name)
            summary[name] = entry
    total = time.perf_counter() - started
    results_out.mkdir(parents=True, exist_ok=True)
    out = results_out / "summary.json"
    out.write_text(json.dumps({"benchmark": "summary", "machine": machine(), "quick": args.quick,
                               "wall_s": round(total, 1), "benchmarks": summary}, indent=2, ensure_ascii=False) + "\n")
    print(f"\n=== all done in {total / 60:.1f} min")
    for name, entry in summary.items():
        print(f"  {name:<22}{'ok' if entry['ok'] else 'FAILED':<8}{entry['wall_s']:>7.0f} s")
    print(f"summary: {out}")
    if not all(e["ok"] for e in summary.values()):
        sys.exit(1)


if __name__ == "__main__":
    main()
