"""Preparing corpora of 10 MB, 100 MB and 1 GB: peak memory and throughput of the data pipeline.

Run: `.venv/bin/python -m benchmarks.data_ingest [--sizes 10 100 1000] [--forms single docs]
[--tokenizers byte bpe]` (part of `make bench`). Writes benchmarks/results/data_ingest.json.

The corpora are real text found on every machine with this Python: the interpreter's standard
library (.py, .txt, .rst, .html, .md files outside site-packages, ~32 MB), repeated until the
size is reached, each repeated file headed by a line naming its copy (so no two documents are
equal; the BPE word statistics stay those of the standard library). Two forms of each size:

- `single`: one `.txt` file (the pipeline cuts it into documents of at most 1 MiB);
- `docs`: one `.jsonl` file, one document per source file.

Each (size, form, tokenizer) is prepared from scratch (a fresh token cache) by
`stackwise.data.pipeline`, the code `stackwise prepare` runs, in a fresh process that reports its
own peak RSS (VmHWM) and the time of each stage. BPE is BPE-4096 trained on a sample of at most
`data.tokenizer.train_bytes` (default 200 MB).

BPE throughput against the tokenizer itself (`bpe_encode_vs_bare`): on the `--ratio-size` corpus
(100 MB) of each form, the pipeline's encoding stage (stream the documents from the file, encode,
append and checksum the shards) and a bare `tokenizers` `encode_batch_fast` loop over the same
documents (held in memory before the clock starts, in batches of the same size, on the same
cores) are timed in alternation, `--repeats` times each, in fresh workers; the table gives the
median of the ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

from benchmarks.common import machine, peak_rss_mb, write_results

SUFFIXES = (".py", ".txt", ".rst", ".html", ".md")
TRAIN_BYTES = 200_000_000  # data.tokenizer.train_bytes' default


def source_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(f for f in root.rglob("*") if f.suffix in SUFFIXES and "site-packages" not in f.parts
                  and f.is_file())


def build_corpus(folder: Path, size_mb: int, form: str) -> Path:
    """`size_mb` MB (10^6 bytes) of standard-library text as one .txt file or one .jsonl file."""
    path = folder / f"stdlib-{size_mb}MB-{form}" / ("corpus.txt" if form == "single" else "corpus.jsonl")
    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    target, written, copy = size_mb * 10**6, 0, 0
    texts = []
    for f in source_files():
        try:
            texts.append((f.name, f.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as out:
        while written < target:
            for name, text in texts:
                doc = f"# copy {copy} of {name}\n{text}"
                line = doc + "\n\n" if form == "single" else json.dumps({"text": doc}) + "\n"
                out.write(line)
                written += len(doc.encode("utf-8"))
                if written >= target:
                    break
            copy += 1
    tmp.rename(path)
    return path


def worker(corpus: str, tokenizer: str, cache: str) -> dict[str, Any]:
    """Prepare `corpus` from scratch as `stackwise prepare` does, timing each stage."""
    from stackwise.data.corpus import open_corpus
    from stackwise.data.pipeline import corpus_tokenizer, prepare_tokens

    cache_dir = Path(cache)
    start = time.perf_counter()
    source = open_corpus([corpus])
    hashed = time.perf_counter()
    made = corpus_tokenizer(source, kind=tokenizer, vocab_size=4096, path=None, train_bytes=TRAIN_BYTES,
                            val_fraction=0.05, cache_dir=cache_dir, progress=False)
    tokenized = time.perf_counter()
    splits = prepare_tokens(source, made.tokenizer, val_fraction=0.05, cache_dir=cache_dir, plan=made.plan,
                            progress=False)
    done = time.perf_counter()
    text_mb = (splits.train_bytes + splits.val_bytes) / 1e6
    return {
        "text_mb": text_mb,
        "documents": splits.train_docs + splits.val_docs,
        "tokens": int(len(splits.train) + len(splits.val)),
        "hash_s": hashed - start,
        "tokenizer_s": tokenized - hashed,  # BPE: the planning pass + training on the sample
        "shards_s": done - tokenized,  # BPE: encoding; byte: the planning pass + encoding
        "total_s": done - start,
        "mb_per_s": text_mb / (done - start),
        "encode_mb_per_s": text_mb / (done - tokenized),
        "sample_mb": made.plan.sample_bytes / 1e6 if made.plan else None,
        "peak_rss_mb": peak_rss_mb(),
    }


def encode_worker(corpus: str, cache: str) -> dict[str, Any]:
    """The pipeline's encoding stage alone (documents streamed from the file, encoded, written and
    checksummed into a fresh shard folder) with the BPE already trained in `cache`."""
    from stackwise.data.corpus import open_corpus
    from stackwise.data.documents import plan_documents
    from stackwise.data.pipeline import corpus_tokenizer, prepare_tokens

    source = open_corpus([corpus])
    tokenizer = corpus_tokenizer(source, kind="bpe", vocab_size=4096, path=None, train_bytes=TRAIN_BYTES,
                                 val_fraction=0.05, cache_dir=Path(cache), progress=False).tokenizer
    plan = plan_documents(source, 0.05)
    shards = Path(cache) / f"shards-{os.getpid()}"
    start = time.perf_counter()
    splits = prepare_tokens(source, tokenizer, val_fraction=0.05, cache_dir=shards, plan=plan, progress=False)
    elapsed = time.perf_counter() - start
    shutil.rmtree(shards)
    text_mb = (splits.train_bytes + splits.val_bytes) / 1e6
    return {"text_mb": text_mb, "encode_s": elapsed, "encode_mb_per_s": text_mb / elapsed}


def bare_worker(corpus: str, cache: str) -> dict[str, Any]:
    """A bare `tokenizers` batch-encode loop over the documents of `corpus` (in memory, read
    before the clock starts), with the BPE the pipeline trained on it (found in `cache`)."""
    from tokenizers import Tokenizer

    from stackwise.data import formats
    from stackwise.data.corpus import open_corpus
    from stackwise.data.tokens import BATCH_BYTES

    path = next((Path(cache) / "tokenizers").glob("bpe-*.json"))
    tok = Tokenizer.from_file(str(path))
    texts, size = [], 0
    for doc in open_corpus([corpus]).documents(formats.FileStats()):
        texts.append(doc.text)
        size += len(doc.text.encode("utf-8"))
    batches, batch, batch_size = [], [], 0
    for text in texts:
        batch.append(text)
        batch_size += len(text.encode("utf-8"))
        if batch_size >= BATCH_BYTES:
            batches.append(batch)
            batch, batch_size = [], 0
    if batch:
        batches.append(batch)
    start = time.perf_counter()
    for b in batches:
        tok.encode_batch_fast(b, add_special_tokens=False)
    elapsed = time.perf_counter() - start
    return {"text_mb": size / 1e6, "encode_s": elapsed, "encode_mb_per_s": size / 1e6 / elapsed}


def run_worker(*args: str) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "benchmarks.data_ingest", "--worker", *args],
                         capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000], help="corpus sizes in MB")
    parser.add_argument("--forms", nargs="+", default=["single", "docs"], choices=["single", "docs"])
    parser.add_argument("--tokenizers", nargs="+", default=["byte", "bpe"], choices=["byte", "bpe"])
    parser.add_argument("--work", default=str(Path(__file__).resolve().parent / ".work" / "data_ingest"),
                        help="where corpora are built (kept for the next run) and caches written (deleted)")
    parser.add_argument("--ratio-size", type=int, default=100,
                        help="corpus size (MB) at which BPE encoding is timed against the bare loop")
    parser.add_argument("--repeats", type=int, default=3, help="alternating pipeline/bare timings (median)")
    parser.add_argument("--out", help="write the JSON here instead of benchmarks/results/data_ingest.json")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        kind, *rest = args.worker
        workers = {"prepare": worker, "encode": encode_worker, "bare": bare_worker}
        print(json.dumps(workers[kind](*rest)))
        return
    work = Path(args.work)
    rows = []
    for size in args.sizes:
        for form in args.forms:
            corpus = build_corpus(work, size, form)
            for tokenizer in args.tokenizers:
                cache = work / "cache"
                shutil.rmtree(cache, ignore_errors=True)
                row = {"size_mb": size, "form": form, "tokenizer": tokenizer,
                       **run_worker("prepare", str(corpus), tokenizer, str(cache))}
                shutil.rmtree(cache, ignore_errors=True)
                rows.append(row)
                print(_line(row), flush=True)
    throughput = [_encode_vs_bare(work, args.ratio_size, form, args.repeats) for form in args.forms] \
        if "bpe" in args.tokenizers else []
    goals = _goals(rows, throughput)
    payload = {"cpu_threads": os.cpu_count(), "rows": rows, "bpe_encode_vs_bare": throughput, "goals": goals}
    if args.out:
        Path(args.out).write_text(json.dumps({"benchmark": "data_ingest", "machine": machine(), **payload}, indent=2))
    else:
        write_results("data_ingest", payload)
    print(json.dumps(goals, indent=2))


def _encode_vs_bare(work: Path, size: int, form: str, repeats: int) -> dict[str, Any]:
    """BPE encoding throughput of the pipeline over the bare loop on one corpus, timed in
    alternation (pipeline, bare, pipeline, ...) in fresh workers: the median of the ratios."""
    corpus, cache = build_corpus(work, size, form), work / "cache"
    shutil.rmtree(cache, ignore_errors=True)
    run_worker("prepare", str(corpus), "bpe", str(cache))  # trains (and caches) the BPE both use
    pipeline, bare = [], []
    for _ in range(repeats):
        pipeline.append(run_worker("encode", str(corpus), str(cache))["encode_mb_per_s"])
        bare.append(run_worker("bare", str(corpus), str(cache))["encode_mb_per_s"])
    shutil.rmtree(cache, ignore_errors=True)
    ratios = [p / b for p, b in zip(pipeline, bare, strict=True)]
    row = {"size_mb": size, "form": form, "pipeline_mb_per_s": pipeline, "bare_mb_per_s": bare,
           "ratios": ratios, "median_ratio": statistics.median(ratios)}
    print(f"BPE encoding, {size} MB {form}: pipeline {statistics.median(pipeline):.2f} MB/s, bare "
          f"{statistics.median(bare):.2f} MB/s, median ratio {row['median_ratio']:.2f} (of {len(ratios)})", flush=True)
    return row


def _line(r: dict[str, Any]) -> str:
    return (f"{r['size_mb']:>5} MB {r['form']:<6} {r['tokenizer']:<4}: peak RSS {r['peak_rss_mb']:7.0f} MB, "
            f"{r['mb_per_s']:6.1f} MB/s overall, encode {r['encode_mb_per_s']:6.1f} MB/s, {r['total_s']:6.1f} s")


def _goals(rows: list[dict[str, Any]], throughput: list[dict[str, Any]]) -> dict[str, Any]:
    """Peak RSS at the largest size over the smallest, per form and tokenizer; the worst peak; the
    worst median BPE encoding ratio."""
    out: dict[str, Any] = {"peak_ratio_largest_over_smallest": {}}
    for r in rows:
        same = [s for s in rows if s["form"] == r["form"] and s["tokenizer"] == r["tokenizer"]]
        small, large = min(same, key=lambda s: s["size_mb"]), max(same, key=lambda s: s["size_mb"])
        if small is not large:
            out["peak_ratio_largest_over_smallest"][f"{r['form']}/{r['tokenizer']}"] = (
                large["peak_rss_mb"] / small["peak_rss_mb"])
    out["max_peak_rss_mb"] = max(r["peak_rss_mb"] for r in rows)
    out["min_encode_vs_bare"] = min((t["median_ratio"] for t in throughput), default=None)
    return out


if __name__ == "__main__":
    main()
