"""The GPU benchmark suite runs only where a GPU is lent; its code paths are checked here on the
CPU at tiny size (`--smoke`) so it cannot rot between GPU runs. Its figures mean nothing here."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_suite_smoke_runs_every_section(tmp_path):
    out = tmp_path / "gpu_suite.json"
    cmd = [sys.executable, "-m", "benchmarks.gpu_suite", "--smoke", "--rounds", "2", "--steps", "1", "--warmup", "1",
           "--contenders", "machine-bf16", "machine-bf16-loop-adamw", "loop-bf16", "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["smoke"] and result["peak"]["tflops"] > 0
    contenders = result["throughput"]["tiny"]["contenders"]
    assert set(contenders) == {"machine-bf16", "machine-bf16-loop-adamw", "loop-bf16"}
    for row in contenders.values():
        assert len(row["step_s"]) == 2 and row["tokens_per_s"] > 0 and row["flops_per_token"] > 0
    rows = {r["config"]: r for r in result["nf4_memory"]}
    assert set(rows) == {"top stack, fp32 trunk", "top stack, bf16 trunk", "top stack, NF4 trunk",
                         "top stack, QLoRA trunk", "end to end"}
    assert all("skipped" not in r for r in rows.values()), rows
    # the planner sees the trunk shrink: NF4 < bf16 < fp32 weights, and the trunk frozen trains less
    weights = {name: r["weights_estimated_mib"] for name, r in rows.items()}
    assert weights["top stack, NF4 trunk"] < weights["top stack, bf16 trunk"] < weights["top stack, fp32 trunk"]
    assert rows["top stack, fp32 trunk"]["trainable"] < rows["end to end"]["trainable"]


def test_data_ingest_smoke_prepares_every_form_and_reports_the_goals(tmp_path):
    out = tmp_path / "data_ingest.json"
    cmd = [sys.executable, "-m", "benchmarks.data_ingest", "--sizes", "1", "2", "--ratio-size", "1", "--repeats", "1",
           "--work", str(tmp_path / "work"), "--out", str(out)]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    rows = {(r["size_mb"], r["form"], r["tokenizer"]) for r in result["rows"]}
    assert rows == {(s, f, t) for s in (1, 2) for f in ("single", "docs") for t in ("byte", "bpe")}
    for r in result["rows"]:
        assert 0.9 * r["size_mb"] < r["text_mb"] < 1.1 * r["size_mb"] and r["peak_rss_mb"] > 0
        assert (r["tokens"] > r["text_mb"] * 1e6) == (r["tokenizer"] == "byte")  # byte: a token per byte, plus [EOS]s
    assert set(result["goals"]["peak_ratio_largest_over_smallest"]) == {"single/byte", "single/bpe", "docs/byte", "docs/bpe"}
    assert [t["form"] for t in result["bpe_encode_vs_bare"]] == ["single", "docs"]
    assert result["goals"]["min_encode_vs_bare"] == min(t["median_ratio"] for t in result["bpe_encode_vs_bare"]) > 0
