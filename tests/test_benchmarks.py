"""The GPU benchmark suite runs only where a GPU is lent; its code paths are checked here on the
CPU at tiny size (`--smoke`) so it cannot rot between GPU runs. Its figures mean nothing here.
The growth study's pipeline runs the same way at a tiny size, and its interpolation on a curve
worked out by hand."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

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


# ---- the growth study (benchmarks/growth_study.py) ------------------------------------------------

GROWTH_CURVE = [{"flops": 1e12, "val_bpb": 3.0}, {"flops": 4e12, "val_bpb": 2.0}, {"flops": 1.6e13, "val_bpb": 1.5}]


def test_growth_study_flops_to_reach_is_linear_in_log_flops():
    from benchmarks.growth_study import flops_to_reach, value_at_flops

    # 2.5 is halfway from 3.0 (1e12 FLOPs) to 2.0 (4e12): halfway in log FLOPs is sqrt(1e12 · 4e12) = 2e12.
    assert flops_to_reach(GROWTH_CURVE, 2.5) == pytest.approx(2e12, rel=1e-12)
    # a quarter of the way from 2.0 (4e12) to 1.5 (1.6e13): 4e12 · 4^0.25 = 4e12 · sqrt(2)
    assert flops_to_reach(GROWTH_CURVE, 1.875) == pytest.approx(4e12 * 2**0.5, rel=1e-12)
    assert flops_to_reach(GROWTH_CURVE, 3.5) == 1e12  # already there at the first evaluation
    assert flops_to_reach(GROWTH_CURVE, 1.4) is None  # never
    assert value_at_flops(GROWTH_CURVE, 2e12) == pytest.approx(2.5, rel=1e-12)
    assert value_at_flops(GROWTH_CURVE, 8e12) == pytest.approx(1.75, rel=1e-12)
    assert value_at_flops(GROWTH_CURVE, 2e13) is None and value_at_flops(GROWTH_CURVE, 5e11) is None


def test_growth_study_results_md_section_is_replaced_not_duplicated():
    from benchmarks.growth_study import replace_section

    text = "# Results\n\n## A\n\na\n\n## Growth study\n\nold\n\n## B\n\nb\n"
    once = replace_section(text, "## Growth study", "new table")
    assert once == "# Results\n\n## A\n\na\n\n## Growth study\n\nnew table\n\n## B\n\nb\n"
    assert replace_section(once, "## Growth study", "new table") == once
    assert replace_section("# Results\n", "## Growth study", "t") == "# Results\n\n## Growth study\n\nt\n"


def test_growth_study_smoke_runs_arms_and_writes_table_json_and_png(tmp_path):
    from benchmarks import growth_study as gs

    setup = gs.Setup(d_model=16, n_heads=2, seq_len=32, batch_size=4, tokenizer={"kind": "byte"}, evals=4,
                     eval_batches=2, compile=False)
    budget = 0.2  # tokens per parameter: ~31K parameters → 64 steps
    plan = gs.Plan(setup, {budget: ("scratch", "frozen", "scratch_short")}, {budget: (0,)}, tmp_path / "work",
                   corpus_bytes=150_000)
    lines: list[str] = []
    payload, table = gs.study(plan, "growth_study", tmp_path / "out", "test", log=lines.append)
    result = json.loads((tmp_path / "out" / "growth_study.json").read_text())
    assert (tmp_path / "out" / "growth_study.png").stat().st_size > 1000
    assert result["machine"]["cores"] and result["params"] == payload["params"]
    runs = {r["arm"]: r for r in result["runs"]}
    assert set(runs) == {"scratch", "frozen", "scratch_short"}
    steps = setup.steps_for(budget * result["params"])
    assert runs["scratch"]["steps"] == runs["frozen"]["steps"] == steps
    for run in runs.values():  # an eval every quarter of the run, FLOPs growing along it
        assert len(run["curve"]) >= 4 and run["curve"][-1]["step"] == run["steps"]
        flops = [c["flops"] for c in run["curve"]]
        assert flops == sorted(flops) and flops[0] > 0
    # the frozen trunk costs less; scratch_short is scratch cut to the frozen arm's FLOPs
    assert runs["frozen"]["total_flops"] < runs["scratch"]["total_flops"]
    per_step = runs["scratch"]["total_flops"] / steps
    assert runs["scratch_short"]["steps"] == round(runs["frozen"]["total_flops"] / per_step) < steps
    rows = {r["arm"]: r for r in result["summary"][f"{budget:g}"]["rows"]}
    assert rows["scratch"]["flops_vs_scratch"] == [1.0] and rows["scratch"]["flops_to_scratch_final"] == [1.0]
    assert result["summary"][f"{budget:g}"]["equal_flops"] == min(r["total_flops"] for r in runs.values())
    assert table.startswith("Budget 0.2 tokens/parameter") and "| frozen |" in table and table in "\n".join(lines)
    # a second study finds every run finished and trains nothing
    mtimes = {p: p.stat().st_mtime for p in (tmp_path / "work" / "runs").glob("*/study.json")}
    assert len(mtimes) == 3
    gs.study(plan, "growth_study", tmp_path / "out", "test", log=lines.append)
    assert {p: p.stat().st_mtime for p in (tmp_path / "work" / "runs").glob("*/study.json")} == mtimes


def test_growth_study_default_plan_and_every_arm_config_is_valid(tmp_path):
    from argparse import Namespace

    from benchmarks import growth_study as gs

    from stackwise.config import StackWiseConfig

    def plan_for(*flags):
        args = Namespace(budgets=None, seeds=None, arms=None, d_model=None, threads=None, jobs=None, no_compile=False,
                         quick=False, explore=False, full=False, work=str(tmp_path))
        for flag in flags:
            setattr(args, flag, True)
        return gs.build_plan(args)[0]

    default = plan_for()
    assert sorted(default.arms_by_budget) == [5.0, 20.0]
    assert default.seeds_for(20.0, "all_trainable") == (0, 1) and default.seeds_for(20.0, "qlora") == (0,)
    assert default.seeds_for(5.0, "qlora") == (0, 1) and "per_phase_lr" not in default.arms_by_budget[20.0]
    explore = plan_for("explore")
    assert list(explore.arms_by_budget) == [5.0] and explore.seeds_by_budget[5.0] == (0,)
    for arm in gs.ALL_ARMS:  # every arm's config is a valid config
        config = gs.run_config(gs.Setup(), arm, 160, 0, tmp_path / "c.jsonl", tmp_path / "cache")
        StackWiseConfig.from_dict(config)
