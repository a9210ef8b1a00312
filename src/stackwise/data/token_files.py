"""Pretokenized token files (`.bin`), as nanoGPT's `prepare.py` writes them.

A token file is a flat array of token ids with no header, in the byte order of the machine (little
endian everywhere we run), read with `numpy.memmap` and never loaded whole. Its documents are
separated by the tokenizer's [EOS] id (nanoGPT appends `<|endoftext|>` after each document); two
[EOS] in a row make an empty document, which is dropped, and a last document without [EOS] is
kept. The ids must come from the tokenizer named in `data.tokenizer.path`.

Item size: `*.u16.bin` is uint16 and `*.u32.bin` uint32; a plain `*.bin` follows `data.bin_dtype`
(`auto`: uint16 when every id of the tokenizer's own vocabulary fits, as nanoGPT writes GPT-2's
50,257 ids, else uint32).

Split: by document, with the rule text documents follow (`corpus.assign_validation`), each
document scored by a blake2b hash of its ids (as little-endian uint32, so the item size does not
matter); a corpus of one document gives the last ceil(val_fraction · tokens) tokens to validation.
Both splits are written into the token cache (one streaming pass to score the documents, one to
copy them), so a file is read once per cache entry; later runs map the cache entry.
"""

from __future__ import annotations

import hashlib
import math
import os
from array import array
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from stackwise.data.corpus import assign_validation, score_of
from stackwise.data.errors import DataError
from stackwise.data.files import check_regular, open_regular
from stackwise.data.formats import file_format
from stackwise.data.tokenizer import Tokenizer

_CHUNK = 1 << 22  # ids read at a time (8-16 MiB)
_FIX = "list .bin token files written with the tokenizer in data.tokenizer.path"
BIN_DTYPES = ("auto", "uint16", "uint32")
TOKEN_SPLIT_RULE = "token-files-blake2b-u32-v1"  # part of the cache key of every token corpus


@dataclass(frozen=True)
class TokenFile:
    path: Path
    dtype: np.dtype
    how: str  # how the item size was decided, for messages
    tokens: np.ndarray  # memmap (or an empty array)
    guessed: bool = False  # the item size came from the vocabulary (data.bin_dtype: auto), not the user


def base_vocab(tokenizer: Tokenizer) -> int:
    """The ids a token file may hold: the tokenizer's own vocabulary, without the [PAD] / [MASK]
    stackwise added to it."""
    return tokenizer.vocab_size - len(getattr(tokenizer, "added", ()))


def resolve_dtype(path: Path, configured: str, tokenizer: Tokenizer) -> tuple[np.dtype, str, bool]:
    """The item size of a token file: its name's `.u16`/`.u32`, else `data.bin_dtype`, else by the
    tokenizer's vocabulary; how it was decided (for messages); whether it was guessed."""
    named = file_format(path).dtype
    if named:
        return np.dtype(named), f"{named}, from its name", False
    if configured != "auto":
        return np.dtype(configured), f"{configured}, from data.bin_dtype", False
    vocab = base_vocab(tokenizer)
    chosen = "uint16" if vocab <= 2**16 else "uint32"
    verb = "fit" if chosen == "uint16" else "need"
    return np.dtype(chosen), f"{chosen}, as the tokenizer's {vocab:,} ids {verb} {chosen[4:]} bits", True


def open_token_file(path: Path, configured: str, tokenizer: Tokenizer) -> TokenFile:
    """Map a token file; a DataError naming it if its size is not a whole number of ids."""
    dtype, how, guessed = resolve_dtype(path, configured, tokenizer)
    size = check_regular(path, "data.paths", _FIX).st_size
    if size % dtype.itemsize:
        other = "uint16 (name it *.u16.bin)" if dtype.itemsize == 4 else "uint32 (name it *.u32.bin)"
        raise DataError(
            f"{path}: {size:,} bytes is not a whole number of {dtype.name} ids ({dtype.itemsize} bytes each; read "
            f"as {how}); the file is truncated or holds something else; if it was written as {other}, say so",
            path,
        )
    if size == 0:
        return TokenFile(path, dtype, how, np.zeros(0, dtype), guessed)
    with open_regular(path, "data.paths", _FIX) as f:
        tokens = np.memmap(f, dtype=dtype, mode="r")
    return TokenFile(path, dtype, how, tokens, guessed)


@dataclass
class _Documents:
    """The documents of one file: [start, end) spans (end = its [EOS], or the file's end), scores."""

    starts: array
    ends: array
    scores: array


def _check_ids(file: TokenFile, chunk: np.ndarray, offset: int, tokenizer: Tokenizer) -> None:
    vocab = base_vocab(tokenizer)
    bad = chunk >= vocab
    for special in (tokenizer.pad_id, tokenizer.mask_id):
        if special < vocab:  # the tokenizer's own [PAD] / [MASK]: no text ever encodes to them
            bad |= chunk == special
    if not bad.any():
        return
    at = int(np.argmax(bad))
    value = int(chunk[at])
    what = (f"outside the vocabulary of {tokenizer.source if hasattr(tokenizer, 'source') else 'the tokenizer'} "
            f"({vocab:,} ids)" if value >= vocab else "the tokenizer's [PAD] or [MASK], which no text encodes to")
    raise DataError(
        f"{file.path}: token id {value:,} at position {offset + at:,} is {what}; the file was read as {file.how}: "
        "check that data.tokenizer.path names the tokenizer that wrote it, and the item size "
        "(*.u16.bin / *.u32.bin or data.bin_dtype)",
        file.path,
    )


def _check_width(file: TokenFile, chunk: np.ndarray) -> None:
    """A uint32 file read as uint16 shows every second id as 0 (the high halves): say so."""
    if file.dtype != np.uint16 or not file.guessed:
        return
    head = chunk[: 1 << 14]
    if head.size >= 64 and not head[1::2].any() and head[0::2].any():
        raise DataError(
            f"{file.path}: every second uint16 id is 0: this looks like a uint32 file read as uint16 ({file.how}); "
            "name it *.u32.bin or set data.bin_dtype: uint32",
            file.path,
        )


def _scan(file: TokenFile, tokenizer: Tokenizer) -> _Documents:
    """One pass: check every id, find the documents and score each by the hash of its ids."""
    eos, tokens = tokenizer.eos_id, file.tokens
    docs = _Documents(array("q"), array("q"), array("d"))
    digest: Any = None
    start = 0
    for offset in range(0, len(tokens), _CHUNK):
        chunk = np.asarray(tokens[offset : offset + _CHUNK])
        if offset == 0:
            _check_width(file, chunk)
        _check_ids(file, chunk, offset, tokenizer)
        wide = chunk.astype("<u4")
        previous = 0
        for cut in np.flatnonzero(chunk == eos).tolist():
            if offset + cut > start:
                digest = digest or _new_score()
                digest.update(wide[previous:cut])
                docs.starts.append(start)
                docs.ends.append(offset + cut)
                docs.scores.append(score_of(digest))
            digest, start, previous = None, offset + cut + 1, cut + 1
        if previous < chunk.size:
            digest = digest or _new_score()
            digest.update(wide[previous:])
    if len(tokens) > start:
        docs.starts.append(start)
        docs.ends.append(len(tokens))
        docs.scores.append(score_of(digest))
    return docs


def _new_score() -> Any:
    return hashlib.blake2b(digest_size=8, person=b"stackwise-split")


@dataclass
class SplitCounts:
    tokens: list[int]  # train, val (with the [EOS] after every document)
    bytes: list[int]
    documents: list[int]
    rule: str


class _Writer:
    """Appends ids to the train or the validation file, hashing and counting them."""

    def __init__(self, outs: Sequence[BinaryIO], digests: Sequence[Any], dtype: np.dtype, tokenizer: Tokenizer):
        self.outs, self.digests, self.dtype, self.tokenizer = outs, digests, dtype, tokenizer
        self.counts = SplitCounts([0, 0], [0, 0], [0, 0], "")

    def write(self, split: int, ids: np.ndarray) -> None:
        if not ids.size:
            return
        data = ids.astype(self.dtype, copy=False)
        self.outs[split].write(data.data)
        self.digests[split].update(data.data)
        self.counts.tokens[split] += data.size
        self.counts.bytes[split] += int(self.tokenizer.token_byte_lengths[data].sum())

    def eos(self, split: int) -> None:
        self.write(split, np.array([self.tokenizer.eos_id], dtype=self.dtype))


def write_token_splits(
    files: Sequence[TokenFile], tokenizer: Tokenizer, val_fraction: float,
    outs: Sequence[BinaryIO], digests: Sequence[Any], dtype: np.dtype,
) -> SplitCounts:
    """Split the documents of `files` and write the train and validation streams (each document
    followed by [EOS]) to `outs`; `val_fraction` ≥ 1 puts every document in validation."""
    scanned = [_scan(f, tokenizer) for f in files]
    n_docs = sum(len(d.starts) for d in scanned)
    if n_docs == 0:
        names = ", ".join(str(f.path) for f in files[:3])
        raise DataError(f"{names}: the token files hold no tokens; point data.paths at a corpus", files[0].path)
    writer = _Writer(outs, digests, dtype, tokenizer)
    if n_docs == 1 and val_fraction < 1:
        _write_tail(files, scanned, writer, val_fraction)
        return writer.counts
    scores = np.concatenate([np.frombuffer(d.scores, dtype=np.float64) for d in scanned])
    in_val = np.ones(n_docs, dtype=bool) if val_fraction >= 1 else assign_validation(scores, val_fraction)
    first = 0
    for file, docs in zip(files, scanned, strict=True):
        count = len(docs.starts)
        _copy_documents(file, docs, in_val[first : first + count], writer)
        first += count
    writer.counts.documents = [int((~in_val).sum()), int(in_val.sum())]
    writer.counts.rule = "all-validation" if val_fraction >= 1 else "by-document"
    return writer.counts


def _copy_documents(file: TokenFile, docs: _Documents, in_val: np.ndarray, writer: _Writer) -> None:
    """Copy each document of a file (and the [EOS] after it) to its split, chunk by chunk."""
    if not len(docs.starts):
        return
    tokens, n = file.tokens, len(file.tokens)
    starts = np.frombuffer(docs.starts, dtype=np.int64)
    ends = np.frombuffer(docs.ends, dtype=np.int64)
    stop = np.minimum(ends + 1, n)  # a document's span with its [EOS]
    dest = in_val.astype(np.int8)
    prefix = writer.tokenizer.dummy_prefix_bytes
    for offset in range(0, n, _CHUNK):
        chunk = np.asarray(tokens[offset : offset + _CHUNK])
        end = offset + chunk.size
        lo, hi = int(np.searchsorted(stop, offset, side="right")), int(np.searchsorted(starts, end))
        a = np.maximum(starts[lo:hi], offset) - offset  # the documents' spans inside the chunk
        b = np.minimum(stop[lo:hi], end) - offset
        # Per position: the split of its document, -1 between documents (the stray [EOS] of
        # empty ones), as runs: gap, document, gap, document, ..., gap.
        runs = np.empty(2 * (hi - lo) + 1, dtype=np.int64)
        runs[0::2] = np.r_[a, chunk.size] - np.r_[0, b]
        runs[1::2] = b - a
        values = np.full(runs.size, -1, dtype=np.int8)
        values[1::2] = dest[lo:hi]
        where = np.repeat(values, runs)
        for split in (0, 1):
            writer.write(split, chunk[where == split])
        if prefix is not None:  # a token opening a document: its dummy prefix is no text
            begun = starts[lo:hi] >= offset
            for split in (0, 1):
                opening = a[begun & (dest[lo:hi] == split)]
                writer.counts.bytes[split] -= int(prefix[chunk[opening]].sum())
    if ends[-1] == n:  # the last document has no [EOS] of its own
        writer.eos(int(dest[-1]))


def _write_tail(files: Sequence[TokenFile], scanned: Sequence[_Documents], writer: _Writer, val_fraction: float) -> None:
    """One document in all: its last ceil(val_fraction · tokens) tokens are the validation split."""
    file, docs = next((f, d) for f, d in zip(files, scanned, strict=True) if len(d.starts))
    start, end = docs.starts[0], docs.ends[0]
    cut = end - max(1, math.ceil((end - start) * val_fraction))
    for split, (a, b) in enumerate(((start, cut), (cut, end))):
        for offset in range(a, b, _CHUNK):
            writer.write(split, np.asarray(file.tokens[offset : min(b, offset + _CHUNK)]))
        writer.eos(split)
    prefix = writer.tokenizer.dummy_prefix_bytes
    if prefix is not None and cut > start:
        writer.counts.bytes[0] -= int(prefix[int(file.tokens[start])])
    writer.counts.documents = [1, 1]
    writer.counts.rule = "single-document-tail"


def identity_fingerprint(path: Path) -> str:
    """What changes whenever a token file's bytes may have (its size, mtime, ctime, inode, device):
    a token file is not hashed at every start, it may be many gigabytes."""
    st = os.stat(path)
    return f"{st.st_size}:{st.st_mtime_ns}:{st.st_ctime_ns}:{st.st_ino}:{st.st_dev}"
