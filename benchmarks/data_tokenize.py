"""Data-plane timings: BPE-4096 on the built-in corpus, and loader start with a cold vs warm token cache.

Run: `.venv/bin/python benchmarks/data_tokenize.py [--repeats 5]`. Prints a table and writes
benchmarks/results/data_tokenize.json. Every figure is the median of `--repeats` runs; caches live
in a temporary folder (never ~/.cache).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import tokenizers
import torch

from stackwise.data import BPETokenizer, builtin_corpus, split_corpus
from stackwise.training import ProgressiveDataLoader

RESULTS = Path(__file__).resolve().parent / "results" / "data_tokenize.json"


def _timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def bench_bpe(repeats: int) -> dict:
    corpus = builtin_corpus()
    docs = [d.text for d in corpus.documents]
    train = list(split_corpus(corpus, 0.05).train)
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    train_s, encode_s, n_tokens = [], [], 0
    for _ in range(repeats):
        seconds, tok = _timed(lambda: BPETokenizer.train(train, 4096))
        train_s.append(seconds)
        seconds, arrays = _timed(lambda tok=tok: tok.encode_arrays(docs))
        encode_s.append(seconds)
        n_tokens = sum(len(a) for a in arrays)
        assert all(tok.decode(a.tolist()) == d for a, d in zip(arrays, docs, strict=True)), (
            "round trip failed"
        )
    return {
        "corpus_bytes": n_bytes,
        "train_split_bytes": sum(len(t.encode("utf-8")) for t in train),
        "vocab_size": 4096,
        "train_s": statistics.median(train_s),
        "encode_s": statistics.median(encode_s),
        "tokens": n_tokens,
        "bytes_per_token": n_bytes / n_tokens,
        "encode_mb_per_s": n_bytes / statistics.median(encode_s) / 1e6,
    }


def bench_loader_start(kind: str, repeats: int) -> dict:
    tokenizer = {"kind": "bpe", "vocab_size": 4096} if kind == "bpe" else {"kind": "byte"}
    cold, warm = [], []
    for _ in range(repeats):
        with tempfile.TemporaryDirectory() as cache:
            config = {
                "model": {},
                "training": {"seq_len": 256},
                "data": {"cache_dir": cache, "tokenizer": tokenizer},
            }
            cold.append(_timed(lambda config=config: ProgressiveDataLoader(config))[0])
            warm.append(_timed(lambda config=config: ProgressiveDataLoader(config))[0])
    return {"tokenizer": kind, "cold_s": statistics.median(cold), "warm_s": statistics.median(warm)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    ProgressiveDataLoader({"model": {}, "training": {}, "data": {"use_dummy_data": True}})  # imports warm
    bpe = bench_bpe(args.repeats)
    starts = [bench_loader_start(kind, args.repeats) for kind in ("byte", "bpe")]
    result = {
        "benchmark": "data_tokenize",
        "repeats": args.repeats,
        "statistic": "median",
        "machine": {
            "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "numpy": np.__version__,
            "tokenizers": tokenizers.__version__,
        },
        "bpe_4096_builtin": bpe,
        "loader_start": starts,
    }
    print(
        f"BPE-4096 on the built-in corpus ({bpe['corpus_bytes']:,} bytes; trained on the {bpe['train_split_bytes']:,}-byte train split)"
    )
    print(f"  {'train':<22}{bpe['train_s'] * 1000:>9.0f} ms")
    print(
        f"  {'encode (all docs)':<22}{bpe['encode_s'] * 1000:>9.0f} ms  ({bpe['encode_mb_per_s']:.1f} MB/s)"
    )
    print(f"  {'tokens':<22}{bpe['tokens']:>9,}")
    print(f"  {'bytes per token':<22}{bpe['bytes_per_token']:>9.2f}")
    print(f"ProgressiveDataLoader construction, median of {args.repeats}")
    print(f"  {'tokenizer':<12}{'cold cache':>12}{'warm cache':>12}{'speedup':>10}")
    for s in starts:
        print(
            f"  {s['tokenizer']:<12}{s['cold_s'] * 1000:>9.0f} ms{s['warm_s'] * 1000:>9.0f} ms{s['cold_s'] / s['warm_s']:>9.1f}x"
        )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
