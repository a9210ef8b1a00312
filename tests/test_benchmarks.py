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
