"""Corpora: the built-in CPython documentation text or the user's files, split by document.

A corpus is a list of documents. Sources:

- nothing configured (`data.paths: []`): CPython's `pydoc_data.topics.topics`, one document per
  topic, in sorted key order;
- a plain text file: one document (decoded as UTF-8, a leading BOM dropped);
- a `.jsonl` file: one document per non-blank line, taken from the object's `data.text_field`;
- a folder: every `.txt`, `.md`, `.text`, suffix-less and `.jsonl` file below it, recursively, in
  sorted relative-path order; hidden files and folders (name starting with '.') are skipped.

The train/validation split is by document, so no document leaks into both (see `split_corpus`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import stat
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from stackwise.data.errors import DataError
from stackwise.data.files import check_regular, not_regular, read_regular

log = logging.getLogger(__name__)

BUILTIN_NAME = "built-in corpus (pydoc_data.topics)"
TEXT_SUFFIXES = frozenset({".txt", ".md", ".text", ""})
JSONL_SUFFIX = ".jsonl"
# Bump when the split rule changes: it is part of every cache key derived from a split.
SPLIT_RULE = "content-blake2b-v1"

_SURROGATE = re.compile("[\ud800-\udfff]")
_REPLACEMENT_BYTES = "\ufffd".encode()


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # where it came from, for messages: a path, "path:LINE" or "pydoc_data.topics:KEY"


@dataclass(frozen=True)
class Corpus:
    documents: tuple[Document, ...]
    name: str  # how messages refer to the corpus: the configured paths or BUILTIN_NAME
    files: tuple[str, ...] = ()  # every file read, in order (empty for the built-in corpus)
    fingerprint: str = ""  # changes whenever a file's path or bytes change
    replacements: dict[str, int] = field(default_factory=dict)  # file -> invalid UTF-8 sequences replaced


@dataclass(frozen=True)
class CorpusSplit:
    train: tuple[str, ...]
    val: tuple[str, ...]
    train_bytes: int  # exact UTF-8 byte count of the train texts (bits per byte needs it)
    val_bytes: int
    rule: str  # "by-document" or "single-document-tail"


# --------------------------------------------------------------------------------------------
# loading


def builtin_corpus() -> Corpus:
    """CPython's own documentation topics: ~465 KB of English, always available offline."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    documents = tuple(Document(topics[k], f"pydoc_data.topics:{k}") for k in keys if topics[k].strip())
    digest = hashlib.blake2b(b"pydoc_data.topics\0", digest_size=16)
    for doc in documents:
        digest.update(doc.source.encode() + b"\0" + doc.text.encode() + b"\0")
    return Corpus(documents, BUILTIN_NAME, fingerprint=digest.hexdigest())


def load_corpus(paths: Sequence[str], text_field: str = "text") -> Corpus:
    """Read `data.paths` (files, folders, .jsonl); an empty list means the built-in corpus."""
    if not paths:
        return builtin_corpus()
    files = _unique(f for p in paths for f in _expand(p))
    name = describe(paths)
    documents: list[Document] = []
    replacements: dict[str, int] = {}
    digest = hashlib.blake2b(b"files\0", digest_size=16)
    for path in files:
        data = _read_bytes(path)
        digest.update(f"{path.resolve()}\0{len(data)}\0".encode())
        digest.update(hashlib.blake2b(data, digest_size=16).digest())
        if path.suffix.lower() == JSONL_SUFFIX:
            docs, bad = _jsonl_documents(data, path, text_field)
        else:
            docs, bad = _text_documents(data, path)
        documents.extend(docs)
        if bad:
            replacements[str(path)] = bad
            log.warning(
                "%s: replaced %d invalid UTF-8 sequence(s) with U+FFFD; re-save the file as UTF-8 to keep them",
                path,
                bad,
            )
    if not documents:
        raise DataError(
            f"{name}: the corpus is empty (no text in {describe([str(f) for f in files])}); "
            "add text to the files or point data.paths at a corpus",
            files[0],
        )
    return Corpus(tuple(documents), name, tuple(str(f) for f in files), digest.hexdigest(), replacements)


def describe(paths: Sequence[str]) -> str:
    """A short label for a list of paths, for messages."""
    shown = ", ".join(str(p) for p in paths[:3])
    return shown if len(paths) <= 3 else f"{shown}, ... ({len(paths)} paths)"


def _expand(path_str: str) -> list[Path]:
    path = Path(path_str).expanduser()
    if not path.exists():
        raise DataError(
            f"data.paths: {path} does not exist; fix the path (relative paths are resolved from {Path.cwd()})",
            path,
        )
    if not path.is_dir():
        # A FIFO would block the read forever and /dev/zero never ends: only regular files are corpora.
        check_regular(path, "data.paths", "list regular text or .jsonl files (or folders of them)")
        return [path]
    files = sorted(
        (f for f in path.rglob("*") if _wanted(f, path)), key=lambda f: f.relative_to(path).as_posix()
    )
    if not files:
        raise DataError(
            f"data.paths: folder {path} holds no corpus files (looked recursively for .txt, .md, .text, .jsonl "
            "and suffix-less files, skipping hidden ones); add text files or list the files in data.paths",
            path,
        )
    return files


def _wanted(file: Path, root: Path) -> bool:
    parts = file.relative_to(root).parts
    if any(part.startswith(".") for part in parts):
        return False  # .git, .DS_Store and editor swap files are not corpus text
    if file.suffix.lower() not in TEXT_SUFFIXES and file.suffix.lower() != JSONL_SUFFIX:
        return False
    try:
        mode = os.stat(file).st_mode  # follows symlinks, as reading would
    except OSError:
        return False  # a dangling symlink: nothing to read
    if stat.S_ISDIR(mode):
        return False
    if not stat.S_ISREG(mode):  # a FIFO or a device would block or never end: refuse it, named
        raise not_regular(file, mode, f"data.paths (in folder {root})",
                          "remove it from the folder, or list the corpus files in data.paths")
    return True


def _unique(files: Iterable[Path]) -> list[Path]:
    # A file named twice (directly and through its folder) must not count twice.
    seen: set[Path] = set()
    out = []
    for f in files:
        key = f.resolve()
        if key not in seen:
            seen.add(key)
            out.append(f)
    return out


def _read_bytes(path: Path) -> bytes:
    return read_regular(path, "data.paths", "list regular text or .jsonl files (or folders of them)")


def _decode(data: bytes) -> tuple[str, int]:
    """UTF-8 text and the number of invalid byte sequences replaced by U+FFFD."""
    try:
        return data.decode("utf-8-sig"), 0
    except UnicodeDecodeError:
        text = data.decode("utf-8-sig", errors="replace")
        # Each invalid sequence becomes one U+FFFD; genuine U+FFFD characters in the file are not counted.
        return text, text.count("\ufffd") - data.count(_REPLACEMENT_BYTES)


def _text_documents(data: bytes, path: Path) -> tuple[list[Document], int]:
    text, bad = _decode(data)
    return ([Document(text, str(path))] if text.strip() else []), bad


def _jsonl_documents(data: bytes, path: Path, text_field: str) -> tuple[list[Document], int]:
    text, bad = _decode(data)
    documents = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                f"{path} line {number}: not valid JSON ({err.msg} at column {err.colno}); "
                "each line of a .jsonl file must be one JSON object",
                path,
            ) from None
        except RecursionError:
            raise DataError(
                f"{path} line {number}: JSON nested too deeply to read (more than about "
                f"{sys.getrecursionlimit()} levels); each line must be one JSON object with a '{text_field}' string",
                path,
            ) from None
        value = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(value, str):
            raise DataError(_field_problem(path, number, record, text_field), path)
        if _SURROGATE.search(value):
            # JSON may spell lone surrogates ("\ud800"); they cannot be encoded as UTF-8.
            value, n = _SURROGATE.subn("\ufffd", value)
            bad += n
        if value.strip():
            documents.append(Document(value, f"{path}:{number}"))
    return documents, bad


def _field_problem(path: Path, number: int, record: object, text_field: str) -> str:
    where = f"{path} line {number}"
    if not isinstance(record, dict):
        return f"{where}: expected a JSON object with a '{text_field}' field, got {type(record).__name__}"
    if text_field not in record:
        keys = ", ".join(repr(k) for k in list(record)[:8]) or "none"
        return f"{where}: no '{text_field}' field (keys: {keys}); set data.text_field to the key that holds the text"
    return f"{where}: field '{text_field}' must be a string, got {type(record[text_field]).__name__}"


# --------------------------------------------------------------------------------------------
# splitting


def document_score(text: str) -> float:
    """A stable number in [0, 1) derived from the document's content.

    Content, not position or file name, is the document's identity: moving or renaming files
    keeps every document in its split, and exact duplicates always land in the same split.
    """
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"stackwise-split").digest()
    return int.from_bytes(digest, "big") / 2.0**64


def split_corpus(corpus: Corpus, val_fraction: float) -> CorpusSplit:
    """Deterministic train/validation split by document.

    A document goes to validation when `document_score(text) < val_fraction`. Both splits always
    get at least one document: if none scored low enough the lowest-scoring one moves to
    validation; if all did, the highest-scoring one moves back to train. A corpus of one
    document is split inside it instead: its last ceil(val_fraction · characters) characters
    are the validation text.
    """
    texts = [d.text for d in corpus.documents]
    if len(texts) == 1:
        text = texts[0]
        cut = len(text) - max(1, math.ceil(len(text) * val_fraction))
        return _make_split([text[:cut]], [text[cut:]], "single-document-tail")
    scores = [document_score(t) for t in texts]
    in_val = [s < val_fraction for s in scores]
    if not any(in_val):
        low = min(scores)
        in_val = [s == low for s in scores]
    if all(in_val):
        high = max(scores)
        in_val = [s != high for s in scores]
        if all(not v for v in in_val):  # every document has the same content
            in_val = [i == len(texts) - 1 for i in range(len(texts))]
    train = [t for t, v in zip(texts, in_val, strict=True) if not v]
    val = [t for t, v in zip(texts, in_val, strict=True) if v]
    return _make_split(train, val, "by-document")


def _make_split(train: list[str], val: list[str], rule: str) -> CorpusSplit:
    return CorpusSplit(
        tuple(train),
        tuple(val),
        sum(len(t.encode("utf-8")) for t in train),
        sum(len(t.encode("utf-8")) for t in val),
        rule,
    )
