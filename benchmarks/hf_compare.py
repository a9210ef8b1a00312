"""Ours vs Hugging Face on the reference shape: tokens/s and peak memory of one training step.

Shape: vocab 4096, d_model 256, 4 layers, 8 heads, SwiGLU 688, seq 256, batch 8, fp32, AdamW
(lr 3e-4, weight decay 0.1, betas (0.9, 0.95)), gradient clipping at 1.0, untied embeddings on
both sides, so both models hold the same parameters (5,261,568; asserted).

Contenders:

- ours-loop:     a `StackWiseModel` in a plain hand-written loop, its loss from `model.loss(ids,
                 labels)` (the model's own training loss: head and cross-entropy fused in row
                 chunks, logits never materialized);
- ours-logits:   the same model in the same loop with the loss computed the way the HF loop does,
                 `F.cross_entropy(model(ids))` on the logits: isolates the model body;
- ours-machine:  the same model trained by `TrainingMachine.train_step()` (its defaults: the fused
                 head + loss, and AdamW's fused update kernel);
- hf-loop:       `LlamaForCausalLM` (sdpa attention) in the same plain loop, `use_cache=False` (as the
                 Trainer sets it for training);
The plain loops all use `torch.optim.AdamW` with torch's default implementation, so they differ
in the model and its loss only.
- hf-trainer:    `transformers.Trainer` (adamw_torch, constant lr, max_grad_norm 1.0) running its
                 own loop, with the same CE on the logits (`compute_loss_func`).

All see the same batches: the token ids of our `ProgressiveDataLoader` (built-in corpus, BPE-4096),
`batch_at(step)`, precomputed once for the loops and the Trainer; the machine fetches the same
steps from the same loader itself. In this process the HF model starts from a copy of our initial
weights, so the first losses of the two models agree (printed as a check).

tokens/s: rounds of blocks of `--steps` steps alternate between ours-loop, ours-machine and
hf-loop (the order rotates every round), so drifts of the machine's speed hit all alike; each
round also runs one Trainer of `--trainer-warmup` + `--steps` steps, timed over its last `--steps`
steps (its first steps and its setup excluded). Figures are medians over the `--blocks` rounds,
after a warm-up of every contender.

Peak memory: each contender again in its own fresh worker process (`--mem-repeats` times, the
order alternating), which builds data and model, notes its RSS, trains `--mem-steps` steps and
reports `ru_maxrss`: the peak of the whole process (imports included) and the RSS before training,
so the part training adds (activations, gradients, optimizer state) shows as the difference.

`--profile` prints a torch.profiler op table of one step of ours and of HF Llama (no timing).

Run: `.venv/bin/python -m benchmarks.hf_compare [--blocks 5 --steps 6 --mem-repeats 2]`.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import current_rss_mb, median, peak_rss_mb, ru_maxrss_mb, table, timed, write_results

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the models are built from configs
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

VOCAB, D_MODEL, LAYERS, HEADS, FFN, SEQ, BATCH = 4096, 256, 4, 8, 688, 256, 8
LR, WEIGHT_DECAY, BETAS, CLIP = 3e-4, 0.1, (0.9, 0.95), 1.0
HF_PARAMS_NOTED = 5_261_568  # our notes: the HF model's parameter count at this shape
TOKENS_PER_STEP = BATCH * SEQ

CONFIG = {
    "model": {"vocab_size": VOCAB, "d_model": D_MODEL, "n_heads": HEADS, "ffn_hidden": FFN, "max_seq_len": SEQ,
              "tie_embeddings": False, "architecture": {"n_stacks": 2, "blocks_per_stack": 2}},
    "training": {"batch_size": BATCH, "seq_len": SEQ,
                 "optimizer": {"optimizer_type": "AdamW", "lr": LR, "weight_decay": WEIGHT_DECAY,
                               "betas": list(BETAS), "grad_clip": CLIP}},
    "data": {"tokenizer": {"kind": "bpe", "vocab_size": VOCAB}},
    "run": {"eval_every": 10**9, "log_every": 10, "checkpoint_at_transitions": False},
}

# Measured beforehand on the 2-core machine (printed for reference, not claimed by this run).
REFERENCE = {"tokens_per_s": {"ours-loop": 4200, "hf-loop": 4230, "hf-trainer": 3865},
             "peak_rss_mb": {"ours-loop": 800, "hf-loop": 890, "hf-trainer": 991}}

IN_PROCESS = ("ours-loop", "ours-logits", "ours-machine", "hf-loop")
CONTENDERS = (*IN_PROCESS, "hf-trainer")


# ---- building blocks ----------------------------------------------------------------------


def our_config(cache_dir: str | None):
    from stackwise.config import StackWiseConfig

    data = {**CONFIG["data"], **({"cache_dir": cache_dir} if cache_dir else {})}
    return StackWiseConfig.from_dict({**CONFIG, "data": data})


def make_batches(loader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(input_ids, labels) of steps 0..n-1: the batches every contender trains on."""
    return [(b.input_ids, b.labels) for b in (loader.batch_at(step) for step in range(n))]


def _quiet_imports() -> None:
    # transformers imports torchao when it is installed; torchao logs harmless failures to load
    # its CUDA kernels, and torch warns about its pytree registrations.
    for name in ("torchao", "torch.utils._pytree", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="torchao")


def hf_model():
    _quiet_imports()
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=VOCAB, hidden_size=D_MODEL, intermediate_size=FFN, num_hidden_layers=LAYERS,
                         num_attention_heads=HEADS, num_key_value_heads=HEADS, max_position_embeddings=SEQ,
                         tie_word_embeddings=False, attn_implementation="sdpa")
    return LlamaForCausalLM(config)


def copy_ours_into_hf(ours, hf) -> None:
    """HF Llama takes our weights (same layout: q/k/v/o, gate/up/down, pre-norms, RoPE halves)."""
    blocks = [block for stack in ours.rack for block in stack.blocks]
    pairs = [(hf.model.embed_tokens, ours.embedding.tokens), (hf.model.norm, ours.head.norm), (hf.lm_head, ours.head.proj)]
    for layer, block in zip(hf.model.layers, blocks, strict=True):
        a, m = layer.self_attn, layer.mlp
        pairs += [(a.q_proj, block.attention.q), (a.k_proj, block.attention.k), (a.v_proj, block.attention.v),
                  (a.o_proj, block.attention.o), (m.gate_proj, block.mlp.gate), (m.up_proj, block.mlp.up),
                  (m.down_proj, block.mlp.down), (layer.input_layernorm, block.attn_norm),
                  (layer.post_attention_layernorm, block.mlp_norm)]
    with torch.no_grad():
        for theirs, mine in pairs:
            theirs.weight.copy_(mine.weight)


def n_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


def adamw(model) -> torch.optim.Optimizer:
    return torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY, betas=BETAS)


def our_loss(model, input_ids, labels):
    return model.loss(input_ids, labels)


def our_logits_loss(model, input_ids, labels):
    return F.cross_entropy(model(input_ids).flatten(0, 1), labels.flatten())


def hf_loss(model, input_ids, labels):
    # No name holds the logits: they die inside the loss (log_softmax keeps its own output).
    logits = model(input_ids=input_ids, use_cache=False).logits
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten())


LOSS_FNS = {"ours-loop": our_loss, "ours-logits": our_logits_loss, "hf-loop": hf_loss}


def plain_loop(loss_fn, model, optimizer, batches, steps: range) -> torch.Tensor:
    """The hand-written loop every model runs: loss, backward, clip, AdamW (a log line every 10)."""
    model.train()
    loss = torch.zeros(())
    for step in steps:
        input_ids, labels = batches[step]
        loss = loss_fn(model, input_ids, labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0:
            loss.item()  # a plain loop logs too
    return loss


def machine_for(config, model, loader, total_steps: int):
    from stackwise.training import TrainingMachine

    return TrainingMachine(config, total_steps=total_steps, run_dir=False, model=model, data=loader, console=False)


def run_trainer(model, batches, steps: range, warmup: int, out_dir: str) -> float:
    """HF Trainer over batches[steps.start - warmup : steps.stop]; tokens/s over the last len(steps)."""
    _quiet_imports()
    from transformers import PrinterCallback, Trainer, TrainerCallback, TrainingArguments

    class Clock(TrainerCallback):
        def __init__(self) -> None:
            self.ends: list[float] = []

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(time.perf_counter())

    def ce_on_logits(outputs, labels, num_items_in_batch=None):
        logits = outputs.logits
        return F.cross_entropy(logits.flatten(0, 1), labels.flatten())

    first = steps.start - warmup
    assert first >= 0 and warmup >= 1
    samples = [{"input_ids": x[i], "labels": y[i]} for x, y in batches[first:steps.stop] for i in range(x.shape[0])]
    args = TrainingArguments(
        output_dir=out_dir, use_cpu=True, optim="adamw_torch", learning_rate=LR, weight_decay=WEIGHT_DECAY,
        adam_beta1=BETAS[0], adam_beta2=BETAS[1], max_grad_norm=CLIP, lr_scheduler_type="constant",
        warmup_steps=0, per_device_train_batch_size=BATCH, max_steps=warmup + len(steps),
        train_sampling_strategy="sequential", disable_tqdm=True, report_to=[], logging_strategy="no",
        save_strategy="no", eval_strategy="no", dataloader_num_workers=0, remove_unused_columns=False,
    )
    clock = Clock()
    trainer = Trainer(model=model, args=args, train_dataset=samples, compute_loss_func=ce_on_logits, callbacks=[clock])
    trainer.remove_callback(PrinterCallback)  # it prints the end-of-training metrics
    trainer.train()
    ends = clock.ends
    assert len(ends) == warmup + len(steps), f"Trainer ran {len(ends)} steps, expected {warmup + len(steps)}"
    return len(steps) * TOKENS_PER_STEP / (ends[-1] - ends[warmup - 1])


# ---- tokens/s: alternating blocks in this process -------------------------------------------


def throughput(blocks: int, steps: int, warmup: int, trainer_warmup: int, cache_dir: str, out_dir: str) -> dict:
    from stackwise.framework import build_data_loader, build_model

    config = our_config(cache_dir)
    loader = build_data_loader(config)
    total = warmup + blocks * steps
    batches = make_batches(loader, total)
    torch.manual_seed(0)
    base = build_model(config, vocab_size=loader.vocab_size)
    hf_base = hf_model()
    copy_ours_into_hf(base, hf_base)
    params = {"ours": n_params(base), "hf": n_params(hf_base)}
    with torch.no_grad():  # the same function: first-batch losses of the two models
        x, y = batches[0]
        first_loss = {"ours": our_loss(base, x, y).item(), "ours-logits": our_logits_loss(base, x, y).item(),
                      "hf": hf_loss(hf_base, x, y).item()}

    machine = machine_for(config, copy.deepcopy(base), loader, total)
    run = {"ours-machine": lambda r: [machine.train_step() for _ in r]}
    for name, model in (("ours-loop", base), ("ours-logits", base), ("hf-loop", hf_base)):
        model = copy.deepcopy(model)
        optimizer = adamw(model)
        run[name] = lambda r, name=name, model=model, opt=optimizer: plain_loop(LOSS_FNS[name], model, opt, batches, r)
    for name in IN_PROCESS:  # warm-up: first steps allocate, fill the allocator, build RoPE tables
        run[name](range(warmup))
    assert machine.step == warmup
    tps: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    for b in range(blocks):
        r = range(warmup + b * steps, warmup + (b + 1) * steps)
        order = IN_PROCESS[b % len(IN_PROCESS):] + IN_PROCESS[: b % len(IN_PROCESS)]
        for name in order:
            tps[name].append(steps * TOKENS_PER_STEP / timed(lambda name=name, r=r: run[name](r)))
        tps["hf-trainer"].append(run_trainer(copy.deepcopy(hf_base), batches, range(r.start, r.stop), min(trainer_warmup, r.start), out_dir))
        print(f"  round {b + 1}/{blocks}: " + ", ".join(f"{n} {tps[n][-1]:,.0f}" for n in CONTENDERS), file=sys.stderr)
    return {"params": params, "first_batch_loss": first_loss, "tokens_per_s": tps,
            "median_tokens_per_s": {n: median(v) for n, v in tps.items()}}


# ---- peak memory: one fresh process per contender --------------------------------------------


def worker(name: str, steps: int, cache_dir: str | None) -> dict:
    """Build data and model, note the RSS, train `steps` steps, report the process's peak RSS."""
    from stackwise.framework import build_data_loader, build_model

    config = our_config(cache_dir)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as out_dir:
        if name == "ours-machine":
            from stackwise.training import TrainingMachine

            machine = TrainingMachine(config, total_steps=steps, run_dir=False, console=False)
            before = current_rss_mb()
            seconds = timed(lambda: [machine.train_step() for _ in range(steps)])
        else:
            loader = build_data_loader(config)
            batches = make_batches(loader, steps)
            if name in LOSS_FNS:
                model = hf_model() if name == "hf-loop" else build_model(config, vocab_size=loader.vocab_size)
                optimizer = adamw(model)
                before = current_rss_mb()
                seconds = timed(lambda: plain_loop(LOSS_FNS[name], model, optimizer, batches, range(steps)))
            elif name == "hf-trainer":
                model = hf_model()
                _quiet_imports()
                import transformers  # noqa: F401 - the Trainer's imports are part of its footprint

                before = current_rss_mb()
                seconds = timed(lambda: run_trainer(model, batches, range(1, steps), 1, out_dir))
            else:
                raise SystemExit(f"unknown contender {name!r}; expected one of {CONTENDERS}")
    peak = peak_rss_mb()
    return {"contender": name, "rss_before_mb": before, "peak_rss_mb": peak, "train_mem_mb": peak - before,
            "ru_maxrss_mb": ru_maxrss_mb(), "steps": steps, "step_s": seconds / steps}


def spawn(name: str, steps: int, cache_dir: str) -> dict:
    cmd = [sys.executable, "-m", "benchmarks.hf_compare", "--worker", name, "--mem-steps", str(steps), "--cache-dir", cache_dir]
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        raise RuntimeError(f"worker {name} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def memory(repeats: int, steps: int, cache_dir: str) -> list[dict]:
    runs = []
    for r in range(repeats):
        order = CONTENDERS if r % 2 == 0 else CONTENDERS[::-1]
        runs += [spawn(name, steps, cache_dir) for name in order]
    return runs


# ---- profile: where a step's time goes ------------------------------------------------------


def profile(cache_dir: str, rows: int) -> None:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from stackwise.framework import build_data_loader, build_model

    config = our_config(cache_dir)
    loader = build_data_loader(config)
    batches = make_batches(loader, 4)
    torch.manual_seed(0)
    ours = build_model(config, vocab_size=loader.vocab_size)
    hf = hf_model()
    copy_ours_into_hf(ours, hf)
    for label, model in (("ours-loop", ours), ("ours-logits", ours), ("hf-loop", hf)):
        optimizer = adamw(model)
        plain_loop(LOSS_FNS[label], model, optimizer, batches, range(3))  # warm
        with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
            plain_loop(LOSS_FNS[label], model, optimizer, batches, range(3, 4))
        print(f"\n=== {label}: one training step, ops by self CPU time ===")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))


# ---- main ----------------------------------------------------------------------------------


def summarize(result: dict, runs: list[dict]) -> tuple[list[dict], dict]:
    med = result["median_tokens_per_s"]
    mem = {n: {k: median([x[k] for x in runs if x["contender"] == n]) for k in ("rss_before_mb", "peak_rss_mb", "train_mem_mb")}
           for n in CONTENDERS}
    rows = [{"contender": n, "median tok/s": med[n], "min": min(result["tokens_per_s"][n]),
             "max": max(result["tokens_per_s"][n]), "rss before MB": mem[n]["rss_before_mb"],
             "peak RSS MB": mem[n]["peak_rss_mb"], "training adds MB": mem[n]["train_mem_mb"],
             "ref tok/s": REFERENCE["tokens_per_s"].get(n, "-"), "ref RSS MB": REFERENCE["peak_rss_mb"].get(n, "-")}
            for n in CONTENDERS]
    pairs = {"ours-loop/hf-loop": ("ours-loop", "hf-loop"),            # the models, same loop
             "ours-logits/hf-loop": ("ours-logits", "hf-loop"),        # the model bodies, same loss code
             "ours-machine/hf-loop": ("ours-machine", "hf-loop"),
             "ours-machine/hf-trainer": ("ours-machine", "hf-trainer")}  # each library's engine
    ratios = {k: {"tokens_per_s": med[a] / med[b], "peak_rss": mem[a]["peak_rss_mb"] / mem[b]["peak_rss_mb"],
                  "train_mem": mem[a]["train_mem_mb"] / mem[b]["train_mem_mb"]} for k, (a, b) in pairs.items()}
    return rows, {"memory_medians": mem, "ratios": ratios}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=5, help="timed rounds (medians over them)")
    parser.add_argument("--steps", type=int, default=6, help="steps per block")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of each in-process contender first")
    parser.add_argument("--trainer-warmup", type=int, default=2, help="untimed first steps of each Trainer run")
    parser.add_argument("--mem-repeats", type=int, default=2, help="fresh worker processes per contender")
    parser.add_argument("--mem-steps", type=int, default=5, help="training steps in a memory worker")
    parser.add_argument("--profile", action="store_true", help="print op tables of one step of each model and exit")
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--cache-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    _quiet_imports()
    from stackwise.framework import build_data_loader

    if args.worker:
        print(json.dumps(worker(args.worker, args.mem_steps, args.cache_dir)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        cache_dir = str(Path(tmp) / "token_cache")
        if args.profile:
            profile(cache_dir, rows=25)
            return
        started = time.perf_counter()
        build_data_loader(our_config(cache_dir))  # tokenizer and token cache, once, outside the workers
        # Memory first, while this process is still small (see benchmarks.common.peak_rss_mb).
        runs = memory(args.mem_repeats, args.mem_steps, cache_dir)
        result = throughput(args.blocks, args.steps, args.warmup, args.trainer_warmup, cache_dir, str(Path(tmp) / "trainer"))
    params = result["params"]
    assert params["ours"] == params["hf"], f"parameter counts differ: ours {params['ours']:,}, HF {params['hf']:,}"
    rows, extra = summarize(result, runs)
    path = write_results("hf_compare", {
        "config": CONFIG, "blocks": args.blocks, "steps_per_block": args.steps, "warmup": args.warmup,
        "trainer_warmup": args.trainer_warmup, "mem_repeats": args.mem_repeats, "mem_steps": args.mem_steps,
        **result, **extra, "rows": rows, "memory_runs": runs, "reference_measured_beforehand": REFERENCE,
        "wall_s": time.perf_counter() - started})
    print(f"parameters: ours {params['ours']:,}, HF Llama {params['hf']:,} (noted: {HF_PARAMS_NOTED:,}); "
          f"first-batch loss ours {result['first_batch_loss']['ours']:.4f}, HF {result['first_batch_loss']['hf']:.4f} "
          f"(same initial weights; RMSNorm eps 1e-5 vs 1e-6)")
    print(table(rows))
    print("ref: numbers measured beforehand on the 2-core machine, for reference only (not this run)")
    for key, r in extra["ratios"].items():
        verdict = "meets" if r["tokens_per_s"] >= 1.05 else "misses"
        print(f"{key}: tokens/s {r['tokens_per_s']:.3f} ({verdict} the goal ≥ 1.05), peak RSS {r['peak_rss']:.3f}, "
              f"training adds {r['train_mem']:.3f} (goal < 1)")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
