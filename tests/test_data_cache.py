"""The on-disk token cache: reuse, invalidation, layout, byte counts and cache location."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from stackwise.data import (
    ByteTokenizer,
    DummyTokenizer,
    builtin_corpus,
    load_corpus,
    load_token_splits,
    resolve_cache_dir,
    split_corpus,
    token_dtype,
)
from stackwise.data import token_cache as token_cache_module
from stackwise.training import ProgressiveDataLoader


def _write_corpus(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for i in range(6):
        f = folder / f"doc{i}.txt"
        f.write_text(f"Document {i}. " + "The quick brown fox jumps over the lazy dog. " * (20 + i))
        files.append(f)
    return files


def _config(corpus_dir: Path, cache_dir: Path, tokenizer: str = "byte") -> dict:
    return {
        "model": {},
        "training": {"batch_size": 2, "seq_len": 32},
        "data": {
            "paths": [str(corpus_dir)],
            "cache_dir": str(cache_dir),
            "tokenizer": tokenizer,
            "val_fraction": 0.2,
        },
    }


def _count_tokenize_calls(monkeypatch) -> list[int]:
    calls: list[int] = []
    real = token_cache_module.tokenize_documents

    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(token_cache_module, "tokenize_documents", counting)
    return calls


def test_second_load_reuses_the_cache_without_tokenizing(tmp_path, monkeypatch):
    _write_corpus(tmp_path / "corpus")
    calls = _count_tokenize_calls(monkeypatch)
    first = ProgressiveDataLoader(_config(tmp_path / "corpus", tmp_path / "cache"))
    assert len(calls) == 1  # one streaming pass writes both splits
    second = ProgressiveDataLoader(_config(tmp_path / "corpus", tmp_path / "cache"))
    assert len(calls) == 1
    assert isinstance(second._tokens.train, np.memmap)
    assert np.array_equal(first._tokens.train, second._tokens.train)
    assert len(list((tmp_path / "cache" / "tokens").iterdir())) == 1


def test_changed_file_invalidates_the_cache(tmp_path, monkeypatch):
    files = _write_corpus(tmp_path / "corpus")
    calls = _count_tokenize_calls(monkeypatch)
    before = ProgressiveDataLoader(_config(tmp_path / "corpus", tmp_path / "cache"))._tokens
    files[3].write_text(files[3].read_text() + " One more sentence.")
    after = ProgressiveDataLoader(_config(tmp_path / "corpus", tmp_path / "cache"))._tokens
    assert len(calls) == 2
    assert after.key != before.key
    assert len(after.train) + len(after.val) == len(before.train) + len(before.val) + len(
        " One more sentence."
    )


def test_key_covers_tokenizer_val_fraction_and_text_field():
    corpus, key = builtin_corpus(), token_cache_module.cache_key
    base = key(corpus, ByteTokenizer(), 0.05, "text")
    assert key(builtin_corpus(), ByteTokenizer(), 0.05, "text") == base
    variants = {
        key(corpus, ByteTokenizer(), 0.1, "text"),
        key(corpus, DummyTokenizer(300), 0.05, "text"),
        key(corpus, ByteTokenizer(), 0.05, "body"),
    }
    assert base not in variants and len(variants) == 3


def test_cache_layout_dtype_and_byte_counts(tmp_path):
    corpus = builtin_corpus()
    split = split_corpus(corpus, 0.05)
    tokens = load_token_splits(
        corpus, ByteTokenizer(), val_fraction=0.05, text_field="text", cache_dir=tmp_path
    )
    folder = tmp_path / "tokens" / tokens.key
    meta = json.loads((folder / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and tokens.train.dtype == np.uint16
    assert (folder / "train.bin").stat().st_size == 2 * meta["n_train_tokens"]
    assert tokens.train_bytes == split.train_bytes and tokens.val_bytes == split.val_bytes
    # Byte tokens: one token per byte plus one [EOS] per document.
    assert len(tokens.train) == split.train_bytes + len(split.train)
    assert int((tokens.train == 258).sum()) == len(split.train)
    assert not list(tmp_path.glob("tokens/.*.tmp"))  # no temporary folder left behind


def test_damaged_cache_is_rebuilt(tmp_path, monkeypatch):
    corpus = builtin_corpus()
    first = load_token_splits(
        corpus, ByteTokenizer(), val_fraction=0.05, text_field="text", cache_dir=tmp_path
    )
    train_file = tmp_path / "tokens" / first.key / "train.bin"
    expected = np.array(first.train)
    train_file.write_bytes(train_file.read_bytes()[:100])  # truncated, as by a full disk
    calls = _count_tokenize_calls(monkeypatch)
    again = load_token_splits(
        corpus, ByteTokenizer(), val_fraction=0.05, text_field="text", cache_dir=tmp_path
    )
    assert len(calls) == 1
    assert np.array_equal(again.train, expected)


def test_token_dtype():
    assert token_dtype(259) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32


def test_cache_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.setenv("STACKWISE_CACHE", str(tmp_path / "env"))
    assert resolve_cache_dir(str(tmp_path / "cfg")) == tmp_path / "cfg"
    assert resolve_cache_dir(None) == tmp_path / "env"
    monkeypatch.delenv("STACKWISE_CACHE")
    assert resolve_cache_dir(None) == Path.home() / ".cache" / "stackwise"


def test_bpe_loader_cold_then_warm(tmp_path, monkeypatch):
    files = _write_corpus(tmp_path / "corpus")
    config = _config(tmp_path / "corpus", tmp_path / "cache", tokenizer="bpe")
    config["data"]["tokenizer"] = {"kind": "bpe", "vocab_size": 300}
    cold = ProgressiveDataLoader(config)
    calls = _count_tokenize_calls(monkeypatch)
    warm = ProgressiveDataLoader(config)
    assert calls == [] and warm.tokenizer.identity == cold.tokenizer.identity
    corpus = load_corpus([str(f) for f in files])
    text = "".join(d.text for d in corpus.documents)
    decoded = warm.tokenizer.decode(np.concatenate([warm._tokens.train, warm._tokens.val]).tolist())
    assert sorted(decoded) == sorted(text)  # the same characters, split by document into train and val


@pytest.mark.parametrize("field", ["text", "body"])
def test_text_field_is_part_of_the_key(tmp_path, field):
    f = tmp_path / "c.jsonl"
    f.write_text(
        "".join(json.dumps({"text": f"text {i} " * 20, "body": f"body {i} " * 20}) + "\n" for i in range(5))
    )
    tokens = load_token_splits(
        load_corpus([str(f)], field), ByteTokenizer(), val_fraction=0.2, text_field=field, cache_dir=tmp_path
    )
    assert field.encode() in bytes(np.concatenate([tokens.train, tokens.val]).astype(np.uint8))
