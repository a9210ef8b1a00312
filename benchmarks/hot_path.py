"""Hot path: what each choice on the step's critical path is worth, measured side by side.

Variants of one TrainingMachine step (reference shape: d_model 256, 4 blocks, seq 256, batch 8,
BPE-4096), alternating blocks of steps, medians over blocks:

- masked objectives: the head and cross-entropy on the masked positions only (what the machine
  does) vs on every position (the naive loss: logits for ~85% of positions nobody scores);
- clm: the head and cross-entropy fused in row chunks (`Head.loss_sum`, what the machine does) vs
  logits for the whole batch, then `F.cross_entropy`;
- the optimizer: AdamW's fused update kernel (`optimizer.fused: true`, the default) vs torch's
  per-tensor loop;
- logging: one host sync per logged window (`log_every: 10`, the default) vs a sync every step;
- QLoRA trunk: our NF4 decoder (`quant.decode_nf4`) and the adapter update in one `addmm` vs
  torchao's `linear_nf4` and the update added apart (top stack trains, three NF4 + LoRA stacks
  below it);
- data: the share of a step spent building its batch (`batch_at`), which decides whether a
  prefetch thread would pay;
- a torch.profiler table of one step (top ops by CPU time) goes to the JSON for reference.

Run: `.venv/bin/python -m benchmarks.hot_path [--blocks 5 --steps 6]`.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import types

import torch
import torch.nn.functional as F

from benchmarks.common import median, table, write_results
from stackwise.model import quant
from stackwise.model.lora import LoRALinear
from stackwise.training import TrainingMachine


def config(objective: str, log_every: int, tmp: str, fused_adamw: bool = True, qlora: bool = False) -> dict:
    stacks = {"n_stacks": 4, "blocks_per_stack": 1} if qlora else {"n_stacks": 2, "blocks_per_stack": 2}
    phase = {"trainable": "last:1", "trunk": "qlora"} if qlora else {}
    return {
        "model": {"d_model": 256, "n_heads": 8, "max_seq_len": 256, "architecture": stacks},
        "training": {"batch_size": 8, "seq_len": 256, "optimizer": {"fused": fused_adamw}},
        "data": {"tokenizer": {"kind": "bpe", "vocab_size": 4096}, "objective": objective},
        "run": {"dir": tmp, "eval_every": 10**9, "log_every": log_every},
        "schedule": [{"name": "main", "start_t": 0.0, "end_t": 1.0, "model_config": phase}],
    }


def naive_loss(self, batch):
    """`LossForward.forward` the simple way: logits for every position, F.cross_entropy, then
    weighted (masked positions have weight 0)."""
    logits = self.model.head(self.hidden(batch))
    ce = F.cross_entropy(logits.flatten(0, 1).float(), batch.labels.flatten(), reduction="none")
    return (ce * batch.loss_weight.flatten()).sum()


def with_naive_loss(machine: TrainingMachine) -> TrainingMachine:
    unit = machine._loss_unit  # one process: the module the step calls
    assert unit is not None and machine._forward is unit
    unit.forward = types.MethodType(naive_loss, unit)
    return machine


def _torchao_linear_nf4():
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import linear_nf4
    except ImportError:
        from torchao.dtypes.nf4tensor import linear_nf4
    return linear_nf4


def torchao_lora_forward(self, x):
    """`LoRALinear.forward` over torchao's NF4 linear (its decoder), the update added apart."""
    out = _torchao_linear_nf4()(x, self.weight)
    if not self.rank:
        return out
    update = F.linear(F.linear(self.dropout(x), self.lora_A), self.lora_B)
    return out + self.scale * update


def with_torchao_qlora(machine: TrainingMachine) -> TrainingMachine:
    layers = [m for m in machine.model.modules() if isinstance(m, LoRALinear) and quant.is_nf4(m.weight)]
    assert layers and all(layer.bias is None for layer in layers)
    for layer in layers:
        layer.forward = types.MethodType(torchao_lora_forward, layer)
    return machine


def block_time(machine: TrainingMachine, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        machine.train_step()
    return (time.perf_counter() - start) / steps


def compare(a: TrainingMachine, b: TrainingMachine, blocks: int, steps: int) -> tuple[float, float]:
    ta, tb = [], []
    for i in range(blocks):
        first, second = (a, b) if i % 2 == 0 else (b, a)
        t1, t2 = block_time(first, steps), block_time(second, steps)
        (ta, tb)[first is b].append(t1)
        (ta, tb)[second is b].append(t2)
    return median(ta), median(tb)


def profile_table(machine: TrainingMachine) -> str:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        machine.train_step()
    return prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=12)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--blocks", type=int, default=5)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    rows, extra = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        def machine(objective: str, log_every: int = 10, fused_adamw: bool = True, qlora: bool = False) -> TrainingMachine:
            torch.manual_seed(0)
            m = TrainingMachine(config(objective, log_every, tmp, fused_adamw, qlora), total_steps=10**6, run_dir=False,
                                console=False)
            for _ in range(2):
                m.train_step()
            return m

        for objective in ("mlm", "diffusion"):
            t_ours, t_naive = compare(machine(objective), with_naive_loss(machine(objective)), args.blocks, args.steps)
            rows.append({"variant": f"{objective}: loss on masked positions only vs all positions",
                         "ours_s": t_ours, "baseline_s": t_naive, "speedup": t_naive / t_ours})
        t_ours, t_naive = compare(machine("clm"), with_naive_loss(machine("clm")), args.blocks, args.steps)
        rows.append({"variant": "clm: head + cross-entropy fused in row chunks vs logits then F.cross_entropy",
                     "ours_s": t_ours, "baseline_s": t_naive, "speedup": t_naive / t_ours})
        t_ours, t_loop = compare(machine("clm"), machine("clm", fused_adamw=False), args.blocks, args.steps)
        rows.append({"variant": "AdamW: fused update kernel vs torch's per-tensor loop",
                     "ours_s": t_ours, "baseline_s": t_loop, "speedup": t_loop / t_ours})
        if quant.nf4_available():
            t_ours, t_torchao = compare(machine("clm", qlora=True), with_torchao_qlora(machine("clm", qlora=True)),
                                        args.blocks, args.steps)
            rows.append({"variant": "QLoRA trunk: our NF4 decode + addmm update vs torchao's linear_nf4",
                         "ours_s": t_ours, "baseline_s": t_torchao, "speedup": t_torchao / t_ours})

        lazy, eager = machine("clm", 10), machine("clm", 1)
        t_lazy, t_eager = compare(lazy, eager, args.blocks, args.steps)
        rows.append({"variant": "clm: host sync per logged window vs every step",
                     "ours_s": t_lazy, "baseline_s": t_eager, "speedup": t_eager / t_lazy})

        for objective in ("clm", "mlm"):
            m = machine(objective)
            data = []
            for step in range(10):
                start = time.perf_counter()
                m.data.batch(step, 0.0)
                data.append(time.perf_counter() - start)
            step_s = block_time(m, args.steps)
            extra[f"{objective}_batch_ms"] = 1000 * median(data)
            rows.append({"variant": f"{objective}: building the batch, share of a step",
                         "ours_s": median(data), "baseline_s": step_s, "speedup": median(data) / step_s})
        extra["profile_clm_step"] = profile_table(machine("clm"))
    path = write_results("hot_path", {"rows": rows, **extra})
    print(table(rows))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
