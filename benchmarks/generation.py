"""Causal generation: with the KV cache (the default) vs re-running the context for every token.

The reference shape (vocab 4096, d 256, 4 blocks, 8 heads, max_seq_len 256) with random weights,
one prompt of 32 ids continued greedily by 224 tokens, so the sequence ends exactly at the
window (past it both run the whole window every step). The two alternate, medians over the
rounds after a warm-up; greedy decoding lets the benchmark check that both produce the same ids.
Also a GQA (8 query / 2 KV heads) and an MLA model of the same width.

Run: `.venv/bin/python -m benchmarks.generation [--rounds 5]`.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks.common import median, table, timed, write_results
from stackwise.config import StackWiseConfig
from stackwise.model import StackWiseModel
from stackwise.model.sampling import generate_causal

BASE = {"vocab_size": 4096, "d_model": 256, "n_heads": 8, "max_seq_len": 256,
        "architecture": {"n_stacks": 2, "blocks_per_stack": 2}}
VARIANTS = {"mha": {}, "gqa 8/2": {"n_kv_heads": 2}, "mla": {"attention": "mla", "mla": {"kv_rank": 64}}}
PROMPT_LEN, NEW_TOKENS = 32, 224


def model_for(extra: dict) -> StackWiseModel:
    cfg = StackWiseConfig.from_dict({"model": {**BASE, **extra}, "training": {"seq_len": 256}, "data": {}}).model
    torch.manual_seed(0)
    return StackWiseModel(cfg).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS)
    args = parser.parse_args()
    prompt = torch.randint(0, BASE["vocab_size"], (PROMPT_LEN,), generator=torch.Generator().manual_seed(1)).tolist()
    rows = []
    for name, extra in VARIANTS.items():
        model = model_for(extra)
        outputs = {}

        def run(cached: bool, model=model, outputs=outputs) -> None:
            outputs[cached] = generate_causal(model, prompt, args.new_tokens, temperature=0, kv_cache=cached)

        run(True), run(False)  # warm-up
        times: dict[bool, list[float]] = {True: [], False: []}
        for i in range(args.rounds):
            for cached in ((True, False) if i % 2 == 0 else (False, True)):
                times[cached].append(timed(lambda cached=cached: run(cached)))
        cached_s, plain_s = median(times[True]), median(times[False])
        rows.append({"model": name, "cached_tok_s": args.new_tokens / cached_s, "uncached_tok_s": args.new_tokens / plain_s,
                     "speedup": plain_s / cached_s, "same_ids": outputs[True] == outputs[False]})
    path = write_results("generation", {"rows": rows, "prompt_len": PROMPT_LEN, "new_tokens": args.new_tokens,
                                        "rounds": args.rounds})
    print(table(rows))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
