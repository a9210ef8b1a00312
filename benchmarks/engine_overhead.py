"""Engine overhead: TrainingMachine.train_step vs a minimal hand-written PyTorch loop.

Both train the same model (identical copies of one initialization), on the same batches (from the
same loader, fetched inside the timed loop by both), with the same loss (`model.loss`: the fused
head + cross-entropy the machine uses), the same AdamW (torch's fused kernel, the machine's
default) and the same gradient clipping: the ratio is the engine's own cost.
Blocks of steps alternate between the two, so drifts of the machine's speed hit both equally;
the figure is the median tokens/s over the blocks after a warm-up.

Run: `.venv/bin/python -m benchmarks.engine_overhead [--blocks 5 --steps 10]`.
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch

from benchmarks.common import median, table, timed, write_results
from stackwise.config import StackWiseConfig
from stackwise.framework import build_data_loader, build_model
from stackwise.training import TrainingMachine

# The reference shape (vocab 4096, d 256, 4 layers, 8 heads, SwiGLU 688, seq 256, batch 8, AdamW).
CONFIG = {
    "model": {"d_model": 256, "n_heads": 8, "max_seq_len": 256, "architecture": {"n_stacks": 2, "blocks_per_stack": 2}},
    "training": {"batch_size": 8, "seq_len": 256, "optimizer": {"optimizer_type": "AdamW", "lr": 3e-4, "weight_decay": 0.1}},
    "data": {"tokenizer": {"kind": "bpe", "vocab_size": 4096}},
    "run": {"eval_every": 10**9, "log_every": 10, "checkpoint_at_transitions": False},
}


def hand_loop(model, optimizer, loader, steps: range) -> None:
    model.train()
    for step in steps:
        batch = loader.batch_at(step)
        loss = model.loss(batch.input_ids, batch.labels)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0:
            loss.item()  # a plain loop logs too


def run(blocks: int, steps: int, warmup: int) -> dict:
    config = StackWiseConfig.from_dict(CONFIG)
    with tempfile.TemporaryDirectory() as tmp:
        config = config.with_overrides([f"run.dir={tmp}"])
        loader = build_data_loader(config)
        torch.manual_seed(0)
        base = build_model(config, vocab_size=loader.vocab_size)
        total = (blocks + 1) * steps + warmup
        machine = TrainingMachine(config, total_steps=total, run_dir=False, model=copy.deepcopy(base), data=loader, console=False)
        model = copy.deepcopy(base)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, betas=(0.9, 0.95), fused=True)
        for _ in range(warmup):
            machine.train_step()
        hand_loop(model, optimizer, loader, range(warmup))
        tokens = steps * config.training.batch_size * config.training.seq_len
        ours, theirs = [], []
        for b in range(blocks):
            start = warmup + b * steps
            theirs.append(tokens / timed(lambda s=start: hand_loop(model, optimizer, loader, range(s, s + steps))))
            ours.append(tokens / timed(lambda: [machine.train_step() for _ in range(steps)]))
    return {
        "config": CONFIG,
        "blocks": blocks,
        "steps_per_block": steps,
        "tokens_per_s": {"machine": ours, "hand_loop": theirs},
        "median_tokens_per_s": {"machine": median(ours), "hand_loop": median(theirs)},
        "ratio_machine_over_hand": median(ours) / median(theirs),
        "ratio_per_block_median": median([o / t for o, t in zip(ours, theirs, strict=True)]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args()
    result = run(args.blocks, args.steps, args.warmup)
    path = write_results("engine_overhead", result)
    print(table([
        {"loop": "TrainingMachine", "median tok/s": result["median_tokens_per_s"]["machine"]},
        {"loop": "hand-written", "median tok/s": result["median_tokens_per_s"]["hand_loop"]},
    ]))
    print(f"ratio machine / hand-written: {result['ratio_machine_over_hand']:.3f} "
          f"(median of per-block ratios {result['ratio_per_block_median']:.3f}); results: {path}")


if __name__ == "__main__":
    main()
