"""The data pipeline, stage by stage (documents → tokens → shards) and whole: exact against the
in-memory reading, bounded in memory, atomic when killed, and `stackwise prepare`."""

from __future__ import annotations

import io
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import numpy as np
import pytest

from stackwise.data import ByteTokenizer, formats, load_corpus, split_corpus
from stackwise.data import token_cache as token_cache_module
from stackwise.data.corpus import builtin_source, open_corpus
from stackwise.data.documents import plan_documents, sample_documents, split_documents
from stackwise.data.pipeline import corpus_tokenizer, prepare_tokens
from stackwise.data.progress import Progress
from stackwise.data.tokenizer import BPETokenizer
from tests.runs import cli

# ---- stage 1: documents ----------------------------------------------------------------------


def test_cut_pieces_prefers_blank_lines_then_line_ends_and_never_splits_a_character():
    text = ("para one line\nstill one\n\n" * 3 + "x" * 50 + "\n" + "é" * 40).encode()
    pieces = list(formats.cut_pieces(iter([text[i:i + 7] for i in range(0, len(text), 7)]), cap=64))
    assert b"".join(pieces) == text
    assert all(0 < len(p) <= 64 for p in pieces)
    assert pieces[0].endswith(b"\n\n")  # the last blank line within the cap
    for p in pieces:
        p.decode("utf-8")  # every piece is whole characters (the "é" run has no line end at all)
    assert list(formats.cut_pieces(iter([b"short"]), cap=64)) == [b"short"]


def test_a_large_text_file_is_cut_into_documents_that_split_by_content(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "max_document_bytes", 2048)
    paragraphs = [f"Paragraph {i}: " + "words and more words " * (5 + i % 40) for i in range(400)]
    big = tmp_path / "big.txt"
    big.write_text("\n\n".join(paragraphs))
    corpus = load_corpus([str(big)])
    assert len(corpus.documents) > 20
    assert "".join(d.text for d in corpus.documents) == big.read_text()
    assert all(len(d.text.encode()) <= 2048 for d in corpus.documents)
    assert corpus.documents[1].source == f"{big}#2"
    split = split_corpus(corpus, 0.1)
    assert split.rule == "by-document" and split.val and split.train


def test_the_streamed_plan_splits_exactly_as_the_in_memory_split(tmp_path):
    lines = [json.dumps({"text": f"document {i} " + "abc " * (i % 17)}) for i in range(300)]
    (tmp_path / "c.jsonl").write_text("\n".join(lines))
    for paths in ([], [str(tmp_path / "c.jsonl")]):
        source = open_corpus(paths)
        plan = plan_documents(source, 0.05)
        split = split_corpus(load_corpus(paths), 0.05)
        docs = list(split_documents(source, plan))
        assert tuple(t for t, v, _ in docs if not v) == split.train
        assert tuple(t for t, v, _ in docs if v) == split.val
        assert (plan.train_bytes, plan.val_bytes) == (split.train_bytes, split.val_bytes)


def test_the_tokenizer_sample_is_bounded_deterministic_and_spread_over_the_corpus():
    source = builtin_source()
    plan = plan_documents(source, 0.05, sample_budget=100_000)
    assert 50_000 < plan.sample_bytes <= 100_000
    assert not (plan.in_sample & plan.in_val).any()  # training documents only
    again = plan_documents(source, 0.05, sample_budget=100_000)
    assert np.array_equal(plan.in_sample, again.in_sample)
    chosen = np.flatnonzero(plan.in_sample)
    assert chosen.max() > len(plan.in_val) // 2 and chosen.min() < len(plan.in_val) // 2  # not a prefix
    assert sum(len(t.encode()) for t in sample_documents(source, plan)) == plan.sample_bytes
    whole = plan_documents(source, 0.05, sample_budget=10**9)
    assert whole.sample_bytes == whole.train_bytes  # a budget above the split: all of it


# ---- stages 2-3: tokens and shards -----------------------------------------------------------


def test_streamed_shards_equal_the_in_memory_encoding(tmp_path, monkeypatch):
    monkeypatch.setattr(formats, "max_document_bytes", 4096)
    big = tmp_path / "big.txt"
    big.write_text("\n\n".join(f"Section {i}. " + "the rack grows stack by stack. " * (3 + i % 50) for i in range(300)))
    source = open_corpus([str(big)])
    made = corpus_tokenizer(source, kind="bpe", vocab_size=400, path=None, train_bytes=20_000, val_fraction=0.1,
                            cache_dir=tmp_path / "cache", progress=False)
    assert made.plan is not None and made.plan.sample_bytes <= 20_000
    splits = prepare_tokens(source, made.tokenizer, val_fraction=0.1, cache_dir=tmp_path / "cache", plan=made.plan,
                            progress=False)
    split = split_corpus(load_corpus([str(big)]), 0.1)
    tok, eos = made.tokenizer, made.tokenizer.eos_id
    for tokens, texts, n_bytes in ((splits.train, split.train, split.train_bytes), (splits.val, split.val, split.val_bytes)):
        expected = np.concatenate([np.append(tok.encode_arrays([t])[0], eos) for t in texts])
        assert np.array_equal(np.asarray(tokens), expected)
        assert tok.count_bytes(np.asarray(tokens)) == n_bytes  # bits per byte stays exact


def test_bpe_training_reads_the_corpus_once_and_the_shards_reuse_its_plan(tmp_path, monkeypatch):
    from stackwise.data import documents

    passes = []
    real = documents._plan
    monkeypatch.setattr(documents, "_plan", lambda *a, **k: passes.append(1) or real(*a, **k))
    source = builtin_source()
    made = corpus_tokenizer(source, kind="bpe", vocab_size=300, path=None, train_bytes=10**6, val_fraction=0.05,
                            cache_dir=tmp_path, progress=False)
    prepare_tokens(source, made.tokenizer, val_fraction=0.05, cache_dir=tmp_path, plan=made.plan, progress=False)
    assert len(passes) == 1
    again = corpus_tokenizer(source, kind="bpe", vocab_size=300, path=None, train_bytes=10**6, val_fraction=0.05,
                             cache_dir=tmp_path, progress=False)
    assert again.plan is None and again.tokenizer.to_json() == made.tokenizer.to_json()  # cached: no pass
    assert isinstance(again.tokenizer, BPETokenizer)


def test_a_build_that_fails_midway_leaves_no_entry_and_the_next_one_completes(tmp_path, monkeypatch):
    real = token_cache_module.encode_documents

    def interrupted(documents, tokenizer, streams, dtype, progress=None):
        real(iter([next(documents)]), tokenizer, streams, dtype)
        raise KeyboardInterrupt

    monkeypatch.setattr(token_cache_module, "encode_documents", interrupted)
    with pytest.raises(KeyboardInterrupt):
        token_cache_module.load_token_splits(builtin_source(), ByteTokenizer(), val_fraction=0.05, text_field="text",
                                             cache_dir=tmp_path, progress=False)
    assert list((tmp_path / "tokens").iterdir()) == []
    monkeypatch.setattr(token_cache_module, "encode_documents", real)
    made = token_cache_module.load_token_splits(builtin_source(), ByteTokenizer(), val_fraction=0.05,
                                                text_field="text", cache_dir=tmp_path, progress=False)
    assert [p.name for p in (tmp_path / "tokens").iterdir()] == [made.key]


# ---- whole: memory, kill, CLI ----------------------------------------------------------------


def _stdlib_text(size: int) -> str:
    """`size` characters of the interpreter's own sources (real text every machine here has)."""
    parts, total = [], 0
    root = Path(sysconfig.get_paths()["stdlib"])
    for f in sorted(root.glob("*.py")):
        text = f.read_text(encoding="utf-8", errors="replace")
        parts.append(text)
        total += len(text)
        if total >= size:
            break
    text = "".join(parts)
    return (text * (size // len(text) + 1))[:size]


PREPARE = """
import json, sys
from stackwise.data.corpus import open_corpus
from stackwise.data.pipeline import corpus_tokenizer, prepare_tokens
import stackwise.training.loader  # everything `stackwise prepare` imports
def hwm():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmHWM")).split()[1]) // 1024
base = hwm()
corpus, kind, cache = sys.argv[1:4]
source = open_corpus([corpus])
made = corpus_tokenizer(source, kind=kind, vocab_size=1024, path=None, train_bytes=4_000_000, val_fraction=0.05,
                        cache_dir=__import__("pathlib").Path(cache), progress=False)
splits = prepare_tokens(source, made.tokenizer, val_fraction=0.05, cache_dir=__import__("pathlib").Path(cache),
                        plan=made.plan, progress=False)
print(json.dumps({"base_mb": base, "peak_mb": hwm(), "tokens": int(len(splits.train) + len(splits.val))}))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="peak RSS is read from /proc (Linux)")
@pytest.mark.parametrize(("kind", "size_mb", "cap_mb"), [("byte", 40, 120), ("bpe", 12, 250)])
def test_a_corpus_of_tens_of_mb_is_prepared_under_a_memory_cap(tmp_path, kind, size_mb, cap_mb):
    # One 40 MB text file with the byte tokenizer, one 12 MB file with BPE. The whole-corpus code
    # this replaced (ProgressiveDataLoader at f999eb9) grew by 334 MB and 2,434 MB over its imports
    # on these same corpora; the pipeline grows by about 60 MB and 180 MB.
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_stdlib_text(size_mb * 10**6))
    out = subprocess.run([sys.executable, "-c", PREPARE, str(corpus), kind, str(tmp_path / "cache")],
                         capture_output=True, text=True, timeout=300, check=True)
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["tokens"] > size_mb * 10**5
    assert report["peak_mb"] - report["base_mb"] < cap_mb, report


def test_a_killed_preparation_leaves_no_complete_looking_entry(tmp_path):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(_stdlib_text(60 * 10**6))
    cache = tmp_path / "cache"
    config = tmp_path / "c.yaml"
    config.write_text(f"model: {{}}\ntraining: {{}}\ndata: {{paths: [{corpus}], cache_dir: {cache}}}\n")
    proc = subprocess.Popen([sys.executable, "-m", "stackwise", "prepare", str(config)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if any((t / "train.bin").is_file() and (t / "train.bin").stat().st_size > 0
                   for t in (cache / "tokens").glob(".*.tmp")):
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the preparation ended before it could be killed"
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    entries = list((cache / "tokens").iterdir())
    assert entries and all(e.name.startswith(".") and e.name.endswith(".tmp") for e in entries)  # only its temp folder
    source = open_corpus([str(corpus)])
    made = prepare_tokens(source, ByteTokenizer(), val_fraction=0.05, cache_dir=cache, progress=False)
    assert [e.name for e in (cache / "tokens").iterdir()] == [made.key]  # the killed build's folder is gone
    assert len(made.train) + len(made.val) == made.train_bytes + made.val_bytes + made.train_docs + made.val_docs


def _bpe_run(tmp_path: Path) -> Path:
    """A 3-step run (named r) with BPE-300 on 12 small files in tmp_path/corpus; its config file."""
    (tmp_path / "corpus").mkdir()
    for i in range(12):
        (tmp_path / "corpus" / f"d{i}.txt").write_text(f"document {i}: " + "the rack grows stack by stack. " * 20)
    config = tmp_path / "c.yaml"
    config.write_text(
        "model: {d_model: 32, n_heads: 2, max_seq_len: 64, architecture: {n_stacks: 1, blocks_per_stack: 1}}\n"
        "training: {batch_size: 4, seq_len: 32, total_steps: 3}\n"
        f"data: {{paths: [{tmp_path / 'corpus'}], cache_dir: {tmp_path / 'cache'}, tokenizer: {{kind: bpe, vocab_size: 300}}}}\n"
        f"run: {{dir: {tmp_path / 'runs'}, name: r, eval_every: 1000}}\n")
    return config


def test_prepare_then_train_reads_the_shards_without_encoding_again(tmp_path, capsys, monkeypatch):
    config = _bpe_run(tmp_path)
    code, out, err = cli(["prepare", str(config)], capsys)
    assert code == 0, err
    assert "tokenizer: bpe, " in out and "train: 1" in out and "shards: " in out
    calls = []
    monkeypatch.setattr(token_cache_module, "encode_documents", lambda *a, **k: calls.append(1))
    code, out, err = cli(["train", str(config)], capsys)
    assert code == 0, err
    assert calls == []
    code, _, err = cli(["prepare", str(config), "data.use_dummy_data=true"], capsys)
    assert code == 2 and "no corpus to prepare" in err


def test_progress_lines_say_mb_rate_and_time_left():
    stream = io.StringIO()
    progress = Progress("encoding corpus", total_bytes=4_000_000, stream=stream, interval=0)
    progress.advance(1_000_000)
    progress.finish()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith("encoding corpus: 1.0 of 4.0 MB (25%), ") and "MB/s, ETA " in lines[0]
    assert lines[-1].startswith("encoding corpus: 1.0 MB in ")
    quiet = io.StringIO()
    Progress("x", 10, stream=quiet, interval=60).advance(5)  # within its first interval: nothing printed
    assert quiet.getvalue() == ""

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty = Terminal()
    progress = Progress("reading", None, stream=tty, interval=0)
    progress.advance(2_000_000)
    assert tty.getvalue().startswith("\r\x1b[2Kreading: 2.0 MB, ") and "\n" not in tty.getvalue()


def test_generate_and_eval_data_work_from_a_copied_run_folder_without_the_corpus(tmp_path, capsys):
    import shutil

    config, corpus = _bpe_run(tmp_path), tmp_path / "corpus"
    code, _, err = cli(["train", str(config)], capsys)
    assert code == 0, err
    moved = tmp_path / "elsewhere" / "r"
    shutil.copytree(tmp_path / "runs" / "r", moved)
    shutil.rmtree(corpus)
    shutil.rmtree(tmp_path / "cache")
    shutil.rmtree(tmp_path / "runs")
    code, out, err = cli(["generate", str(moved), "--prompt", "the rack", "--max-new-tokens", "5", "--seed", "1"], capsys)
    assert code == 0, err
    assert out.startswith("the rack")
    other = tmp_path / "other.txt"
    other.write_text("a stack of blocks, grown one stack at a time. " * 20)
    code, out, err = cli(["eval", str(moved), "--data", str(other)], capsys)
    assert code == 0, err
    assert "scored " in out and "every document of" in out
    metas = [json.loads(m.read_text()) for m in (tmp_path / "cache").rglob("meta.json")]
    assert [m["files"] for m in metas] == [[str(other)]]  # only the scored file was read
    code, _, err = cli(["eval", str(moved)], capsys)  # its own validation split needs its corpus
    assert code == 2 and str(corpus) in err and "--data" in err


def test_an_in_memory_corpus_is_tokenized_from_its_own_documents(tmp_path):
    from stackwise.data import Corpus, Document, load_token_splits

    mine = Corpus((Document("first text", "a"), Document("second, longer text", "b")), "mine")
    splits = load_token_splits(mine, ByteTokenizer(), val_fraction=0.3, text_field="text", cache_dir=tmp_path,
                               progress=False)
    assert splits.train_bytes + splits.val_bytes == len("first text") + len("second, longer text")
    assert bytes(np.concatenate([splits.train, splits.val])[np.concatenate([splits.train, splits.val]) < 256]
                 .astype(np.uint8)) in (b"first textsecond, longer text", b"second, longer textfirst text")
    other = Corpus((Document("something else", "c"), Document("entirely", "d")), "other")
    assert load_token_splits(other, ByteTokenizer(), val_fraction=0.3, text_field="text", cache_dir=tmp_path,
                             progress=False).key != splits.key  # no shared entry for fingerprint-less corpora


def test_crlf_blank_lines_are_cut_points():
    text = b"one line\r\n\r\n" + b"x" * 30 + b"\r\n" + b"y" * 30
    pieces = list(formats.cut_pieces(iter([text]), cap=40))
    assert pieces[0] == b"one line\r\n\r\n" and b"".join(pieces) == text


def test_decompressed_pieces_stay_bounded_for_a_highly_compressible_file(tmp_path):
    import gzip

    path = tmp_path / "zeros.txt.gz"
    path.write_bytes(gzip.compress(b"a" * (64 * 2**20)))  # 64 MiB of text in ~64 KiB
    with open(path, "rb") as raw:
        sizes = [len(c) for c in formats._decompressed(formats._raw_chunks(raw, path), "gzip", path)]
    assert sum(sizes) == 64 * 2**20 and max(sizes) <= formats._READ_SIZE


def test_temporary_folders_of_dead_builds_are_removed_and_live_ones_kept(tmp_path):
    import socket

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    tokens = tmp_path / "tokens"
    for name, pid in (("dead", int(dead.stdout)), ("live", os.getpid())):
        folder = tokens / f".{name}.abc.tmp"
        folder.mkdir(parents=True)
        (folder / token_cache_module.OWNER_FILE).write_text(f"{socket.gethostname()}:{pid}")
        (folder / "train.bin").write_bytes(b"\0" * 100)
    elsewhere = tokens / ".other-host.abc.tmp"
    elsewhere.mkdir()
    (elsewhere / token_cache_module.OWNER_FILE).write_text("another-host:1")
    token_cache_module.load_token_splits(builtin_source(), ByteTokenizer(), val_fraction=0.05, text_field="text",
                                         cache_dir=tmp_path, progress=False)
    left = sorted(p.name for p in tokens.glob(".*.tmp"))
    assert left == [".live.abc.tmp", ".other-host.abc.tmp"]  # another host's build is judged by its age
    old = time.time() - 2 * token_cache_module._ABANDONED_AFTER
    for f in (elsewhere, *elsewhere.iterdir()):
        os.utime(f, (old, old))
    token_cache_module._remove_abandoned(tokens / "any")
    assert sorted(p.name for p in tokens.glob(".*.tmp")) == [".live.abc.tmp"]
