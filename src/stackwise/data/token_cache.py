"""Pipeline stage 3, shards: tokenized corpora cached on disk as flat token arrays, so a second
run (or every run after `stackwise prepare`) starts at once.

An entry is built in one streaming pass over the corpus (stage 1 `documents` decides the split,
stage 2 `tokens` encodes in batches and appends to the files as it goes) in a temporary folder
that is renamed into place only when complete: a killed preparation leaves no entry that looks
complete, only a temporary folder that the next build replaces.

Layout: `<cache>/tokens/<key>/{train.bin, val.bin, meta.json, verified.json}`. Each `.bin` is the
raw array of token ids (uint16 when the vocabulary fits, else uint32), every document followed by
[EOS], and is opened as a read-only `numpy.memmap`. `meta.json` holds the dtype, the token counts,
the exact UTF-8 byte count of each split's text (for bits per byte) and the sha256 of each `.bin`.

Integrity: opening an entry checks the sizes against `meta.json`, then each file's checksum. The
full hash is computed once: `verified.json` records each file's identity (size, mtime, ctime,
inode, device) when its hash matched, and a later open whose `os.stat` gives the same identity
skips the hash (any write to a file, even one that puts its mtime back, changes its ctime). A
damaged entry is rebuilt with a warning naming the file and what is wrong with it.

The key hashes everything the arrays depend on: the corpus fingerprint (each file's resolved path
and a hash of its bytes, so an edited file invalidates; for token files their identity), the
tokenizer (kind + hash of its definition), `val_fraction`, `text_field`, the split rule, the item
size token files are read with, and this format's version.

A token corpus (`.bin` files) is not tokenized: `token_files.write_token_splits` checks, splits and
copies its ids into the same two files.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import stat
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stackwise.data import formats
from stackwise.data.cache import atomic_write_text, cache_error, ensure_writable, new_temp_dir, publish_dir
from stackwise.data.corpus import SPLIT_RULE, Corpus, CorpusSource
from stackwise.data.documents import DocumentPlan, plan_documents, split_documents
from stackwise.data.errors import DataError
from stackwise.data.files import read_regular
from stackwise.data.progress import Progress
from stackwise.data.token_files import TOKEN_SPLIT_RULE, open_token_file, write_token_splits
from stackwise.data.tokenizer import Tokenizer
from stackwise.data.tokens import TokenStream, encode_documents

log = logging.getLogger(__name__)

FORMAT = "stackwise-tokens-v2"  # v2: meta.json carries a checksum of each .bin
CHECKSUM = "sha256"  # 1.3 GB/s here (SHA-NI), against 0.7 GB/s for blake2b
STAMP_FILE = "verified.json"
OWNER_FILE = "owner.pid"  # in a temporary entry folder: "host:pid" of the process writing it
_ABANDONED_AFTER = 3600.0  # seconds without a write after which any temporary entry folder is removed
_HASH_CHUNK = 1 << 20  # bytes hashed per read when verifying a file
_SPLITS = ("train", "val")


@dataclass(frozen=True)
class TokenSplits:
    """The two token streams of a corpus (documents separated by [EOS])."""

    train: np.ndarray
    val: np.ndarray
    train_bytes: int  # UTF-8 bytes of the train text (separators excluded)
    val_bytes: int
    name: str  # the corpus, for messages
    key: str = ""  # cache key; "" when not cached (dummy data)
    train_file: str = ""  # the cache files the arrays are mapped from ("" when not cached)
    val_file: str = ""
    train_docs: int = 0  # documents in each split (0 when unknown: dummy data)
    val_docs: int = 0

    def source(self, split: str) -> str:
        """What to name in a message about `split`'s tokens: its cache file, or the stream."""
        return (self.train_file if split == "train" else self.val_file) or self.name


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 when every id fits in 16 bits, else uint32: half the disk and page cache."""
    return np.dtype(np.uint16) if vocab_size <= 2**16 else np.dtype(np.uint32)


def cache_key(corpus: CorpusSource | Corpus, tokenizer: Tokenizer, val_fraction: float, text_field: str,
              token_dtypes: Sequence[str] = ()) -> str:
    parts = [
        FORMAT,
        SPLIT_RULE,
        str(formats.max_document_bytes),
        corpus.fingerprint,
        tokenizer.kind,
        tokenizer.identity,
        repr(float(val_fraction)),
        text_field,
    ]
    if corpus.token_files:  # how each file's bytes are read is part of what its ids are
        parts += [TOKEN_SPLIT_RULE, ",".join(token_dtypes)]
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=16).hexdigest()


def as_source(corpus: CorpusSource | Corpus, text_field: str) -> CorpusSource:
    """The streaming source of a corpus (an in-memory `Corpus` streams its own documents)."""
    return corpus if isinstance(corpus, CorpusSource) else corpus.source(text_field)


def load_token_splits(
    corpus: CorpusSource | Corpus,
    tokenizer: Tokenizer,
    *,
    val_fraction: float,
    text_field: str,
    cache_dir: Path,
    plan: DocumentPlan | None = None,
    bin_dtype: str = "auto",
    progress: bool = True,
) -> TokenSplits:
    """The cached token arrays of `corpus`, prepared (once) on a miss; a damaged entry is rebuilt
    with a warning. A cache folder that cannot be written when an entry must be built is a
    DataError naming it. `val_fraction` ≥ 1: every document in validation. `plan`: the corpus's
    document plan when the caller already made it (for the tokenizer's sample). `bin_dtype`: the
    item size of `.bin` files whose name does not say (`data.bin_dtype`). `progress`: report
    long stages on stderr (data.progress)."""
    source = as_source(corpus, text_field)
    token_files = [open_token_file(Path(f), bin_dtype, tokenizer) for f in source.token_files]
    key = cache_key(source, tokenizer, val_fraction, text_field, [f.dtype.name for f in token_files])
    folder = cache_dir / "tokens" / key
    cached, problem = _open(folder, key, source.name)
    if cached is not None:
        return cached
    if problem is not None:
        log.warning("token cache entry %s is damaged (%s); rebuilding it", folder, problem)
    ensure_writable(folder.parent, "writing the token cache" if problem is None
                    else f"rebuilding the damaged token cache entry {folder.name} ({problem})")
    if problem is not None:
        shutil.rmtree(folder, ignore_errors=True)
    if not token_files and plan is None:
        plan = plan_documents(source, val_fraction, progress=progress)
    _build(folder, key, source, tokenizer, plan, val_fraction, token_files, progress)
    opened, problem = _open(folder, key, source.name)
    if opened is None:  # only if the folder vanished or was corrupted right after we wrote it
        raise DataError(f"token cache entry {folder} could not be read back after writing it ({problem})", folder)
    return opened


def tokenize_documents(source: CorpusSource, plan: DocumentPlan, tokenizer: Tokenizer,
                       streams: tuple[TokenStream, TokenStream], dtype: np.dtype, progress: bool) -> None:
    """Stages 1→2: the documents as `plan` splits them, encoded into `streams`."""
    with Progress(f"encoding {source.name}", plan.train_bytes + plan.val_bytes, enabled=progress) as encoding:
        encode_documents(split_documents(source, plan), tokenizer, streams, dtype, encoding)


def _build(
    folder: Path,
    key: str,
    source: CorpusSource,
    tokenizer: Tokenizer,
    plan: DocumentPlan | None,
    val_fraction: float,
    token_files: Sequence[Any],
    progress: bool,
) -> None:
    dtype = token_dtype(tokenizer.vocab_size)
    try:
        _remove_abandoned(folder)
        tmp = new_temp_dir(folder)
        (tmp / OWNER_FILE).write_text(f"{socket.gethostname()}:{os.getpid()}")
    except OSError as err:
        raise cache_error(folder.parent, err, "writing the token cache") from None
    try:
        with open(tmp / "train.bin", "wb") as train, open(tmp / "val.bin", "wb") as val:
            streams = (TokenStream(train), TokenStream(val))
            if plan is not None:
                tokenize_documents(source, plan, tokenizer, streams, dtype, progress)
                n_docs = [plan.n_train_documents, plan.n_val_documents]
                n_bytes, rule = [plan.train_bytes, plan.val_bytes], plan.rule
            else:
                made = write_token_splits(token_files, tokenizer, val_fraction, (train, val),
                                          [s.digest for s in streams], dtype)
                for stream, count in zip(streams, made.tokens, strict=True):
                    stream.tokens = count
                n_docs, n_bytes, rule = made.documents, made.bytes, made.rule
            for f in (train, val):
                f.flush()
                os.fsync(f.fileno())
        counts = dict(zip(_SPLITS, (s.tokens for s in streams), strict=True))
        checksums = {f"{name}.bin": s.digest.hexdigest() for name, s in zip(_SPLITS, streams, strict=True)}
        meta = {
            "format": FORMAT,
            "key": key,
            "corpus": source.name,
            "files": list(source.files),
            "dtype": dtype.name,
            "tokenizer": {
                "kind": tokenizer.kind,
                "identity": tokenizer.identity,
                "vocab_size": tokenizer.vocab_size,
            },
            "val_fraction": val_fraction,
            "text_field": source.text_field,
            "split_rule": rule,
            "n_train_docs": n_docs[0],
            "n_val_docs": n_docs[1],
            "n_train_tokens": counts["train"],
            "n_val_tokens": counts["val"],
            "train_bytes": n_bytes[0],
            "val_bytes": n_bytes[1],
            "checksum": CHECKSUM,
            "checksums": checksums,
        }
        if token_files:
            meta["token_files"] = [{"path": str(f.path), "dtype": f.dtype.name} for f in token_files]
        _write_durably(tmp / "meta.json", json.dumps(meta, indent=2))
        if plan is not None:  # token files: the bytes were counted from the ids themselves
            _check_bytes(meta, streams, tokenizer)
        _stamp(tmp, meta)  # the hashes were taken from the bytes as written: no need to read them back
        (tmp / OWNER_FILE).unlink()
        publish_dir(tmp, folder)
    except OSError as err:  # a full disk, or the folder made read-only under us
        shutil.rmtree(tmp, ignore_errors=True)
        if plan is not None:
            need = (plan.train_bytes + plan.val_bytes + plan.n_documents + 1) * dtype.itemsize
        else:
            need = sum(len(f.tokens) for f in token_files) * dtype.itemsize
        raise cache_error(folder.parent, err, f"writing the token cache entry {folder.name} "
                          f"(up to {need / 2**20:.1f} MiB)") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _remove_abandoned(folder: Path) -> None:
    """Delete the temporary entry folders that killed preparations left behind, so that a killed
    1 GB preparation does not hold its gigabytes forever: those written on this host by a process
    that is gone, and, where the writer cannot be checked (another host sharing the cache, no
    owner recorded yet), those without a write for `_ABANDONED_AFTER` seconds."""
    for tmp in folder.parent.glob(".*.tmp"):
        try:
            owner = _owner(tmp)
            if owner is not None and owner[0] == socket.gethostname():
                if _pid_alive(owner[1]):
                    continue
            elif time.time() - _last_write(tmp) < _ABANDONED_AFTER:
                continue
        except OSError:
            continue  # published or removed meanwhile, or unreadable: not ours to judge
        shutil.rmtree(tmp, ignore_errors=True)


def _owner(tmp: Path) -> tuple[str, int] | None:
    """(host, pid) of the process writing `tmp`, from its OWNER_FILE; None if unreadable."""
    try:
        host, pid = (tmp / OWNER_FILE).read_text().rsplit(":", 1)
        return host, int(pid)
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # alive, another user's
    return True


def _last_write(tmp: Path) -> float:
    return max([tmp.stat().st_mtime] + [f.stat().st_mtime for f in tmp.iterdir()])


def _write_durably(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def _check_bytes(meta: dict, streams: tuple[TokenStream, TokenStream], tokenizer: Tokenizer) -> None:
    # Bits per byte counts bytes through token_byte_lengths; say so if that disagrees with the text.
    for name, stream in zip(_SPLITS, streams, strict=True):
        if stream.decoded_bytes != meta[f"{name}_bytes"] and tokenizer.kind != "dummy":
            log.warning(
                "%s: %s tokens decode to %d bytes but the text has %d; bits per byte will be off by that ratio "
                "(does the tokenizer normalize or add prefix spaces?)",
                meta["corpus"],
                name,
                stream.decoded_bytes,
                meta[f"{name}_bytes"],
            )


def stream_bytes(tokenizer: Tokenizer, tokens: np.ndarray | Sequence[int], chunk: int = 1 << 22) -> int:
    """`tokenizer.count_bytes` of a whole token stream, read in chunks (a memmap is never loaded whole)."""
    total, opens = 0, True
    for start in range(0, len(tokens), chunk):
        part = np.asarray(tokens[start : start + chunk])
        total += tokenizer.count_bytes(part, opens_document=opens)
        opens = bool(part[-1] == tokenizer.eos_id)
    return total


# ---- integrity ------------------------------------------------------------------------------


def _identity(st: os.stat_result) -> list[int]:
    """What changes whenever a file's bytes may have: size, mtime, ctime (which no user can set
    back), inode and device."""
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def file_checksum(path: Path) -> str:
    """sha256 of the file, read in 1 MiB chunks (the file must be a regular file)."""
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as f:
        buffer = bytearray(_HASH_CHUNK)
        view = memoryview(buffer)
        while n := f.readinto(buffer):
            digest.update(view[:n])
    return digest.hexdigest()


def _stamp(folder: Path, meta: dict) -> None:
    """Record that every file of the entry matched its checksum as it is now (best effort: a
    read-only cache keeps working, it just hashes again at every open)."""
    body = {f"{s}.bin": {"checksum": meta["checksums"][f"{s}.bin"], "identity": _identity(os.stat(folder / f"{s}.bin"))}
            for s in _SPLITS}
    with contextlib.suppress(OSError):
        atomic_write_text(folder / STAMP_FILE, json.dumps(body))


def _stamped(folder: Path) -> dict:
    try:
        body = json.loads(read_regular(folder / STAMP_FILE, "token cache"))
    except (DataError, ValueError, RecursionError):
        return {}
    return body if isinstance(body, dict) else {}


def _verify(folder: Path, meta: dict) -> str | None:
    """None if every file matches its checksum, else what is wrong (for the warning)."""
    checksums = meta.get("checksums")
    if meta.get("checksum") != CHECKSUM or not isinstance(checksums, dict):
        return f"meta.json has no {CHECKSUM} checksums"
    stamped = _stamped(folder)
    hashed = False
    for split in _SPLITS:
        name = f"{split}.bin"
        st = os.stat(folder / name)
        seen = stamped.get(name)
        if isinstance(seen, dict) and seen.get("checksum") == checksums.get(name) and seen.get("identity") == _identity(st):
            continue
        if file_checksum(folder / name) != checksums.get(name):
            return f"{name} does not match its checksum"
        hashed = True
    if hashed:
        _stamp(folder, meta)
    return None


def _open(folder: Path, key: str, name: str) -> tuple[TokenSplits | None, str | None]:
    """Memory-map a complete, intact cache entry: (splits, None); (None, None) if there is no
    entry; (None, what is wrong) if it is damaged."""
    if not folder.exists():
        return None, None
    try:
        meta = json.loads(read_regular(folder / "meta.json", "token cache"))
        if not isinstance(meta, dict):
            return None, "meta.json is not a JSON object"
        if meta.get("format") != FORMAT or meta.get("key") != key:
            return None, f"meta.json is for format {meta.get('format')!r}, key {meta.get('key')!r}"
        dtype = np.dtype(meta["dtype"])
        arrays, files = [], []
        for split in _SPLITS:
            path, n = folder / f"{split}.bin", int(meta[f"n_{split}_tokens"])
            st = os.stat(path)
            if not stat.S_ISREG(st.st_mode):
                return None, f"{path.name} is not a regular file"
            if st.st_size != n * dtype.itemsize:
                return None, f"{path.name} holds {st.st_size} bytes, meta.json says {n * dtype.itemsize}"
            files.append(path)
        problem = _verify(folder, meta)
        if problem is not None:
            return None, problem
        for path, split in zip(files, _SPLITS, strict=True):
            n = int(meta[f"n_{split}_tokens"])
            arrays.append(np.memmap(path, dtype=dtype, mode="r", shape=(n,)) if n else np.zeros(0, dtype))
        splits = TokenSplits(arrays[0], arrays[1], int(meta["train_bytes"]), int(meta["val_bytes"]), name, key,
                             str(files[0]), str(files[1]), int(meta["n_train_docs"]), int(meta["n_val_docs"]))
    except DataError as err:  # meta.json not a regular file, unreadable
        return None, str(err)
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as err:
        return None, f"{type(err).__name__}: {err}"
    return splits, None
