"""GPU suite: bf16 autocast with and without torch.compile, MFU, fused AdamW, and NF4 memory on CUDA.

Run on a machine with a CUDA GPU: `python -m benchmarks.gpu_suite [--budget-s 420]`. Writes
benchmarks/results/gpu_suite.json (`--out` elsewhere) after every section, so a run cut short
keeps what it measured. `--smoke` runs tiny shapes on the CPU to check the code paths (its figures
mean nothing). `transformers` is optional: without it the Hugging Face rows are skipped.

Sections, in order of priority (each skipped with a note when the time budget runs out):

1. `peak`: the bf16 matrix-product rate of this GPU (8192³, random data): the ceiling MFU is
   also quoted against, besides the datasheet's dense bf16 figure.
2. `throughput` for a 125M- and a 350M-parameter model (Llama-style, untied, vocab 32768,
   seq 1024, batch 16, AdamW, clip 1.0, `data.use_dummy_data`): contenders are the TrainingMachine
   in fp32 / bf16 autocast (fused AdamW, the default) / bf16 with torch's per-tensor AdamW loop /
   bf16 with `run.compile`, our model in a plain hand-written loop, and Hugging Face
   `LlamaForCausalLM` of the same shape in the same loop, eager and compiled. Every contender is
   warmed up (compilation included), then rounds of `--steps` steps alternate between contenders;
   figures are medians over `--rounds` rounds. MFU = tokens/s × FLOPs per token / peak, with
   FLOPs per token = 6·N + 12·L·T·d (N: weights of every matrix product, LM head included,
   embedding excluded; L layers, T sequence length, d attention width; PaLM's formula, attention
   counted in full with no causal discount).
3. `nf4_memory`: a ~1B-parameter rack (d 2048, 16 blocks in 8 stacks, ffn 5632) in its last
   growth phase (top stack trains) with the trunk frozen in fp32, bf16 or NF4, or as QLoRA, and
   trained end to end: weights resident on the GPU, peak `torch.cuda.max_memory_allocated` of
   a few steps, the step time, and `stackwise plan`'s CUDA estimate for the same config.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import RESULTS_DIR, machine, median, table

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

DATASHEET_BF16_TFLOPS = {"H100": 989.4, "H200": 989.4}  # dense, SXM parts (NVIDIA datasheets)

SHAPES: dict[str, dict[str, int]] = {
    "125M": {"d_model": 768, "n_heads": 12, "n_blocks": 12, "ffn_hidden": 2048, "vocab": 32768, "seq": 1024, "batch": 16},
    "350M": {"d_model": 1024, "n_heads": 16, "n_blocks": 24, "ffn_hidden": 2816, "vocab": 32768, "seq": 1024, "batch": 16},
}
SMOKE_SHAPES: dict[str, dict[str, int]] = {
    "tiny": {"d_model": 64, "n_heads": 4, "n_blocks": 4, "ffn_hidden": 128, "vocab": 512, "seq": 64, "batch": 4},
}
# contenders per shape, in order of priority
CONTENDERS = {
    "125M": ["machine-bf16", "machine-bf16-compile", "loop-bf16", "hf-bf16", "machine-bf16-loop-adamw", "machine-fp32",
             "hf-bf16-compile"],
    "350M": ["machine-bf16", "machine-bf16-compile", "hf-bf16"],
}
NF4_SHAPE = {"d_model": 2048, "n_heads": 16, "n_stacks": 8, "blocks_per_stack": 2, "ffn_hidden": 5632, "vocab": 32768,
             "seq": 2048, "batch": 4}
NF4_SMOKE = {"d_model": 64, "n_heads": 4, "n_stacks": 4, "blocks_per_stack": 1, "ffn_hidden": 128, "vocab": 512,
             "seq": 64, "batch": 2}
NF4_CASES = {
    "top stack, fp32 trunk": {"trainable": "last:1"},
    "top stack, bf16 trunk": {"trainable": "last:1", "trunk_precision": "bf16"},
    "top stack, NF4 trunk": {"trainable": "last:1", "trunk_precision": "nf4"},
    "top stack, QLoRA trunk": {"trainable": "last:1", "trunk": "qlora"},
    "end to end": {},
}
LR, CLIP = 3e-4, 1.0


class Clock:
    """The suite's time budget: a section starts only if its estimate fits in what is left."""

    def __init__(self, budget_s: float):
        self.deadline = time.monotonic() + budget_s

    def left(self) -> float:
        return self.deadline - time.monotonic()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def mib(n: float) -> float:
    return n / 2**20


# ---- 1. the GPU's bf16 matrix rate ----------------------------------------------------------


def matmul_peak(device: torch.device, n: int, reps: int = 10) -> dict[str, Any]:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    seconds = (time.perf_counter() - start) / reps
    return {"n": n, "dtype": str(dtype), "tflops": 2 * n**3 / seconds / 1e12}


# ---- 2. throughput and MFU ------------------------------------------------------------------


def our_config(shape: dict[str, int], device: str, precision: str, compile_: bool, fused: bool, tmp: str):
    from stackwise.config import StackWiseConfig

    n_stacks = 4 if shape["n_blocks"] % 4 == 0 else 1
    return StackWiseConfig.from_dict({
        "model": {"vocab_size": shape["vocab"], "d_model": shape["d_model"], "n_heads": shape["n_heads"],
                  "ffn_hidden": shape["ffn_hidden"], "max_seq_len": shape["seq"], "tie_embeddings": False,
                  "architecture": {"n_stacks": n_stacks, "blocks_per_stack": shape["n_blocks"] // n_stacks}},
        "training": {"batch_size": shape["batch"], "seq_len": shape["seq"],
                     "optimizer": {"lr": LR, "grad_clip": CLIP, "fused": fused}},
        "data": {"use_dummy_data": True},
        "run": {"dir": tmp, "device": device, "precision": precision, "compile": compile_, "eval_every": 10**9,
                "log_every": 10, "checkpoint_at_transitions": False, "activation_cache": False},
    })


def hf_llama(shape: dict[str, int]):
    import logging

    for name in ("torchao", "transformers", "torch.utils._pytree"):
        logging.getLogger(name).setLevel(logging.ERROR)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=shape["vocab"], hidden_size=shape["d_model"], intermediate_size=shape["ffn_hidden"],
                         num_hidden_layers=shape["n_blocks"], num_attention_heads=shape["n_heads"],
                         num_key_value_heads=shape["n_heads"], max_position_embeddings=shape["seq"],
                         tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def flops_per_token(model: torch.nn.Module, shape: dict[str, int]) -> float:
    """6·N + 12·L·T·d: N counts the weights of every matrix product (nn.Linear, LM head
    included); the embedding lookup does no matrix product and is left out."""
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    return 6 * n_matmul + 12 * shape["n_blocks"] * shape["seq"] * shape["d_model"]


class LoopContender:
    """A hand-written bf16 loop: autocast forward, CE on the logits, clip, fused AdamW."""

    def __init__(self, model, logits_fn, batches, device: torch.device, bf16: bool):
        self.model, self.logits_fn, self.batches, self.device = model.to(device), logits_fn, batches, device
        self.bf16 = bf16
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=LR, weight_decay=0.1, betas=(0.9, 0.95), fused=True)
        self.i = 0

    def step(self) -> None:
        input_ids, labels = self.batches[self.i % len(self.batches)]
        self.i += 1
        autocast = torch.autocast(self.device.type, dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()
        with autocast:
            logits = self.logits_fn(self.model, input_ids)
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten())
        del logits
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), CLIP)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def state_bytes(self) -> float:
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        moments = sum(t.numel() * t.element_size() for s in self.optimizer.state.values() for t in s.values()
                      if torch.is_tensor(t))
        return params + moments


class MachineContender:
    def __init__(self, config):
        from stackwise.training import TrainingMachine

        self.machine = TrainingMachine(config, total_steps=10**6, run_dir=False, console=False)
        self.model = self.machine.model

    def step(self) -> None:
        self.machine.train_step()

    def state_bytes(self) -> float:
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        opt = self.machine.optim.optimizer
        moments = sum(t.numel() * t.element_size() for s in opt.state.values() for t in s.values() if torch.is_tensor(t))
        return params + moments


def build_contender(name: str, shape: dict[str, int], device: torch.device, batches, tmp: str):
    from stackwise.framework import build_model

    dev = device.type
    if name.startswith("machine-"):
        precision = "fp32" if name == "machine-fp32" else "bf16"
        fused = not name.endswith("-loop-adamw")
        return MachineContender(our_config(shape, dev, precision, name.endswith("-compile"), fused, tmp))
    if name == "loop-bf16":
        torch.manual_seed(0)
        model = build_model(our_config(shape, dev, "bf16", False, True, tmp), vocab_size=shape["vocab"])
        return LoopContender(model, lambda m, x: m(x), batches, device, bf16=True)
    if name.startswith("hf-"):
        torch.manual_seed(0)
        model = hf_llama(shape)
        contender = LoopContender(model, lambda m, x: m(input_ids=x, use_cache=False).logits, batches, device, bf16=True)
        if name.endswith("-compile"):
            contender.model = torch.compile(contender.model)
        return contender
    raise ValueError(name)


def throughput(shape_name: str, shape: dict[str, int], names: list[str], device: torch.device, peak: dict,
               rounds: int, steps: int, warmup: int, clock: Clock) -> dict[str, Any]:
    from stackwise.framework import build_data_loader

    tokens = shape["batch"] * shape["seq"]
    result: dict[str, Any] = {"shape": shape, "tokens_per_step": tokens, "contenders": {}, "skipped": {}}
    with tempfile.TemporaryDirectory() as tmp:
        loader = build_data_loader(our_config(shape, device.type, "bf16", False, True, tmp))
        batches = [(b.input_ids.to(device), b.labels.to(device)) for b in (loader.batch_at(s) for s in range(8))]
        live: dict[str, Any] = {}
        for name in names:
            if clock.left() < (90 if "compile" in name else 30):
                result["skipped"][name] = "time budget"
                continue
            try:
                started = time.perf_counter()
                contender = build_contender(name, shape, device, batches, tmp)
                for _ in range(warmup):
                    contender.step()
                sync(device)
                live[name] = contender
                result["contenders"][name] = {"setup_and_warmup_s": time.perf_counter() - started,
                                              "flops_per_token": flops_per_token(contender.model, shape),
                                              "params": sum(p.numel() for p in contender.model.parameters())}
                print(f"  {shape_name} {name}: ready in {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
            except Exception as err:
                result["skipped"][name] = f"{type(err).__name__}: {err}"
                traceback.print_exc()
        step_s: dict[str, list[float]] = {name: [] for name in live}
        extra_mb: dict[str, list[float]] = {name: [] for name in live}
        order = list(live)
        for r in range(rounds):
            if clock.left() < 10:
                result["rounds_cut_short"] = r
                break
            for name in order[r % len(order):] + order[: r % len(order)]:
                before = torch.cuda.memory_allocated() if device.type == "cuda" else 0
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                sync(device)
                start = time.perf_counter()
                for _ in range(steps):
                    live[name].step()
                sync(device)
                step_s[name].append((time.perf_counter() - start) / steps)
                if device.type == "cuda":
                    extra_mb[name].append(mib(torch.cuda.max_memory_allocated() - before))
        ceiling = peak.get("datasheet_tflops")
        measured_ceiling = peak.get("tflops")
        for name, contender in live.items():
            row = result["contenders"][name]
            if not step_s[name]:
                continue
            seconds = median(step_s[name])
            achieved = tokens / seconds * row["flops_per_token"] / 1e12
            row.update({
                "step_s": step_s[name], "median_step_s": seconds, "tokens_per_s": tokens / seconds,
                "achieved_tflops": achieved,
                "mfu_datasheet": achieved / ceiling if ceiling else None,
                "mfu_measured_peak": achieved / measured_ceiling if measured_ceiling else None,
                "state_mb": mib(contender.state_bytes()),
                "step_adds_mb": median(extra_mb[name]) if extra_mb[name] else None,
            })
        base = result["contenders"].get("machine-bf16", {}).get("tokens_per_s")
        for row in result["contenders"].values():
            if base and "tokens_per_s" in row:
                row["vs_machine_bf16"] = row["tokens_per_s"] / base
        live.clear()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return result


# ---- 3. NF4 trunk memory --------------------------------------------------------------------


def nf4_config(shape: dict[str, int], phase: dict, device: str, tmp: str):
    from stackwise.config import StackWiseConfig

    return StackWiseConfig.from_dict({
        "model": {"vocab_size": shape["vocab"], "d_model": shape["d_model"], "n_heads": shape["n_heads"],
                  "ffn_hidden": shape["ffn_hidden"], "max_seq_len": shape["seq"], "tie_embeddings": False,
                  "architecture": {"n_stacks": shape["n_stacks"], "blocks_per_stack": shape["blocks_per_stack"]}},
        "training": {"batch_size": shape["batch"], "seq_len": shape["seq"], "optimizer": {"lr": LR}},
        "data": {"use_dummy_data": True},
        "run": {"dir": tmp, "device": device, "precision": "bf16" if device == "cuda" else "fp32",
                "eval_every": 10**9, "log_every": 10**9, "checkpoint_at_transitions": False, "activation_cache": False},
        "schedule": [{"name": "main", "start_t": 0.0, "end_t": 1.0, "model_config": phase}],
    })


def nf4_memory(shape: dict[str, int], device: torch.device, steps: int, clock: Clock) -> list[dict[str, Any]]:
    from stackwise.cli.plan import plan_rows
    from stackwise.training import TrainingMachine

    rows = []
    for name, phase in NF4_CASES.items():
        if clock.left() < 45:
            rows.append({"config": name, "skipped": "time budget"})
            continue
        try:
            with tempfile.TemporaryDirectory() as tmp:
                config = nf4_config(shape, phase, device.type, tmp)
                estimate = plan_rows(config, 10**6, device=device.type)[0]["memory"]
                machine = TrainingMachine(config, total_steps=10**6, run_dir=False, console=False)
                machine.planes  # noqa: B018 - enter the phase: growth roles, precisions, optimizer
                gc.collect()
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                    torch.cuda.reset_peak_memory_stats()
                resident = torch.cuda.memory_allocated() if device.type == "cuda" else 0
                machine.train_step()  # first step: optimizer state appears
                sync(device)
                start = time.perf_counter()
                for _ in range(steps):
                    machine.train_step()
                sync(device)
                step_s = (time.perf_counter() - start) / steps
                peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
                model = machine.model
                rows.append({
                    "config": name, "params": model.num_parameters(),
                    "trainable": model.num_parameters(trainable_only=True),
                    "weights_resident_mib": mib(resident), "weights_estimated_mib": mib(estimate.weights),
                    "peak_mib": mib(peak), "estimated_peak_mib": mib(estimate.total),
                    "estimate_error": (estimate.total / peak - 1) if peak else None,
                    "step_s": step_s, "estimate_breakdown_mib": {k: mib(v) for k, v in estimate.to_dict().items()},
                })
                del machine, model
        except Exception as err:
            rows.append({"config": name, "skipped": f"{type(err).__name__}: {err}"})
            traceback.print_exc()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        print(f"  nf4 {name}: {rows[-1]}", file=sys.stderr, flush=True)
    return rows


# ---- report ---------------------------------------------------------------------------------


def summary_tables(results: dict[str, Any]) -> str:
    out = []
    for shape_name, section in results.get("throughput", {}).items():
        rows = [{"contender": n, "tok/s": r.get("tokens_per_s"), "step ms": 1e3 * r["median_step_s"] if "median_step_s" in r else None,
                 "MFU": r.get("mfu_datasheet"), "vs machine-bf16": r.get("vs_machine_bf16"),
                 "step adds MiB": r.get("step_adds_mb"), "setup s": r.get("setup_and_warmup_s")}
                for n, r in section["contenders"].items()]
        out.append(f"{shape_name}:\n{table(rows)}")
        if section.get("skipped"):
            out.append(f"  skipped: {section['skipped']}")
    rows = [{k: r.get(k) for k in ("config", "weights_resident_mib", "peak_mib", "estimated_peak_mib", "estimate_error", "step_s")}
            for r in results.get("nf4_memory", []) if "skipped" not in r]
    if rows:
        out.append("NF4 memory:\n" + table(rows))
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--budget-s", type=float, default=420)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--out", type=Path, default=RESULTS_DIR / "gpu_suite.json")
    parser.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU: checks the code paths only")
    parser.add_argument("--only", nargs="*", default=None, help="sections: peak throughput nf4_memory")
    parser.add_argument("--contenders", nargs="*", default=None, help="keep only these throughput contenders")
    args = parser.parse_args()
    clock = Clock(args.budget_s)
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.smoke:
        sys.exit("no CUDA device: run with --smoke to check the code paths on the CPU")
    shapes = SMOKE_SHAPES if args.smoke else SHAPES
    contenders = {"tiny": CONTENDERS["125M"]} if args.smoke else CONTENDERS
    if args.contenders is not None:
        contenders = {shape: [n for n in names if n in args.contenders] for shape, names in contenders.items()}
    sections = args.only or ["peak", "throughput", "nf4_memory"]
    results: dict[str, Any] = {"benchmark": "gpu_suite", "machine": machine(), "smoke": args.smoke,
                               "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
                               "cuda": torch.version.cuda, "args": {k: str(v) for k, v in vars(args).items()}}
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 (torch's default)

    def save() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    started = time.perf_counter()
    peak: dict[str, Any] = {}
    if "peak" in sections:
        peak = matmul_peak(device, 256 if args.smoke else 8192)
        name = results["device"]
        peak["datasheet_tflops"] = next((v for k, v in DATASHEET_BF16_TFLOPS.items() if k in name), None)
        results["peak"] = peak
        print(f"matmul: {peak}", file=sys.stderr, flush=True)
        save()
    if "throughput" in sections:
        results["throughput"] = {}
        for shape_name, shape in shapes.items():
            results["throughput"][shape_name] = throughput(shape_name, shape, contenders[shape_name], device, peak,
                                                           args.rounds, args.steps, args.warmup, clock)
            save()
    if "nf4_memory" in sections:
        results["nf4_memory"] = nf4_memory(NF4_SMOKE if args.smoke else NF4_SHAPE, device, 3, clock)
        save()
    results["wall_s"] = time.perf_counter() - started
    save()
    print(summary_tables(results))
    print(f"results: {args.out} ({results['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
