"""Tokenized corpora cached on disk as flat token arrays, so a second run starts at once.

Layout: `<cache>/tokens/<key>/{train.bin, val.bin, meta.json}`. Each `.bin` is the raw array of
token ids (uint16 when the vocabulary fits, else uint32), every document followed by [EOS], and is
opened as a read-only `numpy.memmap`. `meta.json` holds the dtype, the token counts and the exact
UTF-8 byte count of each split's text (for bits per byte).

The key hashes everything the arrays depend on: the corpus fingerprint (each file's resolved path
and a hash of its bytes, so an edited file invalidates), the tokenizer (kind + hash of its
definition), `val_fraction`, `text_field`, the split rule and this format's version.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from stackwise.data.cache import new_temp_dir, publish_dir
from stackwise.data.corpus import SPLIT_RULE, Corpus, CorpusSplit, split_corpus
from stackwise.data.tokenizer import Tokenizer

log = logging.getLogger(__name__)

FORMAT = "stackwise-tokens-v1"
_CHUNK_DOCS = 512  # documents encoded per call: bounds memory while keeping tokenizers' threads busy


@dataclass(frozen=True)
class TokenSplits:
    """The two token streams of a corpus (documents separated by [EOS])."""

    train: np.ndarray
    val: np.ndarray
    train_bytes: int  # UTF-8 bytes of the train text (separators excluded)
    val_bytes: int
    name: str  # the corpus, for messages
    key: str = ""  # cache key; "" when not cached (dummy data)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32: half the disk and page cache."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def cache_key(corpus: Corpus, tokenizer: Tokenizer, val_fraction: float, text_field: str) -> str:
    parts = [
        FORMAT,
        SPLIT_RULE,
        corpus.fingerprint,
        tokenizer.kind,
        tokenizer.identity,
        repr(float(val_fraction)),
        text_field,
    ]
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=16).hexdigest()


def tokenize_documents(tokenizer: Tokenizer, texts: Sequence[str], out: BinaryIO, dtype: np.dtype) -> int:
    """Append the tokens of `texts` to `out`, each document followed by [EOS]; return the count."""
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    total = 0
    for start in range(0, len(texts), _CHUNK_DOCS):
        parts = []
        for ids in tokenizer.encode_arrays(texts[start : start + _CHUNK_DOCS]):
            parts += [ids.astype(dtype, copy=False), eos]
        chunk = np.concatenate(parts)
        chunk.tofile(out)
        total += chunk.size
    return total


def load_token_splits(
    corpus: Corpus,
    tokenizer: Tokenizer,
    *,
    val_fraction: float,
    text_field: str,
    cache_dir: Path,
    split: CorpusSplit | None = None,
) -> TokenSplits:
    """The cached token arrays of `corpus`, tokenizing (once) on a miss."""
    key = cache_key(corpus, tokenizer, val_fraction, text_field)
    folder = cache_dir / "tokens" / key
    cached = _open(folder, key, corpus.name)
    if cached is not None:
        return cached
    if folder.exists():
        log.warning("rebuilding damaged token cache %s", folder)
        shutil.rmtree(folder, ignore_errors=True)
    split = split or split_corpus(corpus, val_fraction)
    _build(folder, key, corpus, tokenizer, split, val_fraction, text_field)
    opened = _open(folder, key, corpus.name)
    if opened is None:  # only if the folder vanished or was corrupted right after we wrote it
        raise OSError(f"token cache {folder} could not be read back after writing it")
    return opened


def _build(
    folder: Path,
    key: str,
    corpus: Corpus,
    tokenizer: Tokenizer,
    split: CorpusSplit,
    val_fraction: float,
    text_field: str,
) -> None:
    dtype = token_dtype(tokenizer.vocab_size)
    tmp = new_temp_dir(folder)
    try:
        counts = {}
        for name, texts in (("train", split.train), ("val", split.val)):
            with open(tmp / f"{name}.bin", "wb") as f:
                counts[name] = tokenize_documents(tokenizer, texts, f, dtype)
                f.flush()
                os.fsync(f.fileno())
        meta = {
            "format": FORMAT,
            "key": key,
            "corpus": corpus.name,
            "files": list(corpus.files),
            "dtype": dtype.name,
            "tokenizer": {
                "kind": tokenizer.kind,
                "identity": tokenizer.identity,
                "vocab_size": tokenizer.vocab_size,
            },
            "val_fraction": val_fraction,
            "text_field": text_field,
            "split_rule": split.rule,
            "n_train_docs": len(split.train),
            "n_val_docs": len(split.val),
            "n_train_tokens": counts["train"],
            "n_val_tokens": counts["val"],
            "train_bytes": split.train_bytes,
            "val_bytes": split.val_bytes,
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        _check_bytes(tmp, meta, tokenizer)
        publish_dir(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_bytes(folder: Path, meta: dict, tokenizer: Tokenizer) -> None:
    # Bits per byte counts bytes through token_byte_lengths; say so if that disagrees with the text.
    lengths = tokenizer.token_byte_lengths
    for name in ("train", "val"):
        tokens = np.fromfile(folder / f"{name}.bin", dtype=meta["dtype"])
        counted = int(lengths[tokens].sum()) if tokens.size else 0
        if counted != meta[f"{name}_bytes"] and tokenizer.kind != "dummy":
            log.warning(
                "%s: %s tokens decode to %d bytes but the text has %d; bits per byte will be off by that ratio "
                "(does the tokenizer normalize or add prefix spaces?)",
                meta["corpus"],
                name,
                counted,
                meta[f"{name}_bytes"],
            )


def _open(folder: Path, key: str, name: str) -> TokenSplits | None:
    """Memory-map a complete cache entry, or None if it is missing or damaged."""
    try:
        meta = json.loads((folder / "meta.json").read_text(encoding="utf-8"))
        if meta.get("format") != FORMAT or meta.get("key") != key:
            return None
        dtype = np.dtype(meta["dtype"])
        arrays = []
        for split in ("train", "val"):
            path, n = folder / f"{split}.bin", int(meta[f"n_{split}_tokens"])
            if path.stat().st_size != n * dtype.itemsize:
                return None
            arrays.append(np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return TokenSplits(arrays[0], arrays[1], int(meta["train_bytes"]), int(meta["val_bytes"]), name, key)
