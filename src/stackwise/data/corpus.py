"""Corpora: the built-in CPython documentation text or the user's files, split by document.

A corpus is a list of documents. Sources:

- nothing configured (`data.paths: []`): CPython's `pydoc_data.topics.topics`, one document per
  topic, in sorted key order;
- a file, read in the form its name says (`stackwise.data.formats`): plain text is one document
  (decoded as UTF-8, a leading BOM dropped), `.jsonl` one per non-blank line (the object's
  `data.text_field`), `.parquet` one per row of the `data.text_field` column, `.gz` / `.zst` the
  same once decompressed; `.bin` files hold token ids (`stackwise.data.token_files`) and make a
  token corpus, which is never mixed with text;
- a folder: the files below it that `data.include` matches (glob patterns relative to the folder),
  by default every file with a suffix in `formats.FOLDER_SUFFIXES` or none, recursively, in
  sorted relative-path order; hidden files and folders (name starting with '.') are skipped.

The train/validation split is by document, so no document leaks into both (see `split_corpus`).
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import stat
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from stackwise.data import formats
from stackwise.data.errors import DataError
from stackwise.data.files import check_regular, not_regular

log = logging.getLogger(__name__)

BUILTIN_NAME = "built-in corpus (pydoc_data.topics)"
TEXT_SUFFIXES = formats.TEXT_SUFFIXES
JSONL_SUFFIX = formats.JSONL_SUFFIX
# Bump when the split rule changes: it is part of every cache key derived from a split.
SPLIT_RULE = "content-blake2b-v2-cut"  # v2: documents over formats.max_document_bytes are cut


@dataclass(frozen=True)
class Document:
    text: str
    source: str  # where it came from, for messages: a path, "path:LINE" or "pydoc_data.topics:KEY"


@dataclass(frozen=True)
class CorpusSource:
    """Where a corpus's documents come from, resolved and fingerprinted but not read: the
    documents are streamed by `documents()` (memory holds one file chunk and one document at a
    time), as often as a pipeline stage needs."""

    name: str  # how messages refer to the corpus: the configured paths or BUILTIN_NAME
    files: tuple[str, ...] = ()  # every file to read, in order (empty for the built-in corpus)
    fingerprint: str = ""  # changes whenever a file's path or bytes change
    text_field: str = "text"
    token_files: tuple[str, ...] = ()  # a token corpus (.bin files): no documents until split by the cache
    stored_bytes: int = 0  # the files' sizes on disk (for progress and messages)
    in_memory: tuple[Document, ...] | None = None  # the documents themselves (a `Corpus` held in memory)

    @property
    def builtin(self) -> bool:
        return not self.files and self.in_memory is None

    @property
    def text_bytes_estimate(self) -> int | None:
        """About how many bytes of text the documents hold (for progress): the stored size when
        every file is uncompressed text or JSON lines, else unknown."""
        forms = [formats.file_format(Path(f)) for f in self.files]
        plain = all(form.compression is None and form.kind in ("text", "jsonl") for form in forms)
        return self.stored_bytes if self.files and plain and not self.token_files else None

    def documents(self, stats: formats.FileStats | None = None, warn: bool = True) -> Iterator[Document]:
        """Every document, in corpus order; invalid UTF-8 replaced and counted in `stats` (with
        `warn`, a warning naming each such file is logged once it has been read whole)."""
        if self.token_files:
            raise ValueError("a token corpus has no text documents (token_files.write_token_splits reads it)")
        if self.in_memory is not None:
            yield from self.in_memory
            return
        if self.builtin:
            yield from _builtin_documents()
            return
        stats = stats if stats is not None else formats.FileStats()
        for name in self.files:
            path = Path(name)
            for text, source in formats.iter_records(path, self.text_field, stats):
                yield Document(text, source)
            if warn and stats.replacements.get(name):
                log.warning("%s: replaced %d invalid UTF-8 sequence(s) with U+FFFD; re-save the file as UTF-8 "
                            "to keep them", path, stats.replacements[name])


@dataclass(frozen=True)
class Corpus:
    """A corpus read whole into memory (`load_corpus`): for small corpora and tests. Training
    streams a `CorpusSource` instead (stackwise.data.pipeline)."""

    documents: tuple[Document, ...]
    name: str
    files: tuple[str, ...] = ()
    fingerprint: str = ""
    replacements: dict[str, int] = field(default_factory=dict)  # file -> invalid UTF-8 sequences replaced
    token_files: tuple[str, ...] = ()

    def source(self, text_field: str = "text") -> CorpusSource:
        """A source that streams these very documents (not the files again: they may have changed,
        and a corpus built from `Document`s has none), fingerprinted by their content when the
        corpus has no fingerprint."""
        if self.token_files:
            return CorpusSource(self.name, self.files, self.fingerprint, text_field, self.token_files)
        fingerprint = self.fingerprint
        if not fingerprint:
            digest = hashlib.blake2b(b"documents\0", digest_size=16)
            for doc in self.documents:
                data = doc.text.encode("utf-8")
                digest.update(len(data).to_bytes(8, "little") + data)
            fingerprint = digest.hexdigest()
        return CorpusSource(self.name, self.files, fingerprint, text_field, in_memory=self.documents)


@dataclass(frozen=True)
class CorpusSplit:
    train: tuple[str, ...]
    val: tuple[str, ...]
    train_bytes: int  # exact UTF-8 byte count of the train texts (bits per byte needs it)
    val_bytes: int
    rule: str  # "by-document", "single-document-tail" or "all-validation"


# --------------------------------------------------------------------------------------------
# loading


def _builtin_documents() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for key in sorted(topics):
        if topics[key].strip():
            yield Document(topics[key], f"pydoc_data.topics:{key}")


def builtin_source() -> CorpusSource:
    """CPython's own documentation topics: ~465 KB of English, always available offline."""
    digest = hashlib.blake2b(b"pydoc_data.topics\0", digest_size=16)
    for doc in _builtin_documents():
        digest.update(doc.source.encode() + b"\0" + doc.text.encode() + b"\0")
    return CorpusSource(BUILTIN_NAME, fingerprint=digest.hexdigest())


def builtin_corpus() -> Corpus:
    """The built-in corpus, in memory."""
    return read_corpus(builtin_source())


def open_corpus(paths: Sequence[str], text_field: str = "text", include: Sequence[str] | None = None) -> CorpusSource:
    """Resolve `data.paths` (files and folders, in every form `formats` knows) and fingerprint
    them (each file's bytes hashed in 1 MiB chunks); nothing is decoded. An empty list means the
    built-in corpus. `include`: glob patterns choosing the files of a folder (`data.include`)."""
    if not paths:
        return builtin_source()
    files = _unique(f for p in paths for f in _expand(p, include))
    name = describe(paths)
    kinds = [formats.file_format(f).kind for f in files]
    if "tokens" in kinds:
        return _token_corpus(files, kinds, name)
    digest, stored = hashlib.blake2b(b"files\0", digest_size=16), 0
    for path in files:
        file_hash, size = formats.file_digest(path)
        digest.update(f"{path.resolve()}\0{size}\0".encode())
        digest.update(file_hash)
        stored += size
    return CorpusSource(name, tuple(str(f) for f in files), digest.hexdigest(), text_field, stored_bytes=stored)


def read_corpus(source: CorpusSource) -> Corpus:
    """Every document of `source` in memory; an empty corpus is a DataError naming its files."""
    if source.token_files:
        return Corpus((), source.name, source.files, source.fingerprint, token_files=source.token_files)
    stats = formats.FileStats()
    documents = tuple(source.documents(stats))
    if not documents:
        raise empty_corpus(source)
    return Corpus(documents, source.name, source.files, source.fingerprint, stats.replacements)


def load_corpus(paths: Sequence[str], text_field: str = "text", include: Sequence[str] | None = None) -> Corpus:
    """`open_corpus` read whole into memory (small corpora; training streams instead)."""
    return read_corpus(open_corpus(paths, text_field, include))


def empty_corpus(source: CorpusSource) -> DataError:
    return DataError(
        f"{source.name}: the corpus is empty (no text in {describe(list(source.files))}); "
        "add text to the files or point data.paths at a corpus",
        source.files[0] if source.files else None,
    )


def _token_corpus(files: list[Path], kinds: list[str], name: str) -> CorpusSource:
    """A corpus of `.bin` token files: nothing is read here (they may be gigabytes); the token
    cache splits and copies them once, keyed by each file's identity."""
    from stackwise.data.token_files import identity_fingerprint

    text = [f for f, k in zip(files, kinds, strict=True) if k != "tokens"]
    if text:
        raise DataError(
            f"{name}: data.paths mixes token files (.bin) with text files ({describe([str(f) for f in text])}); "
            "a corpus is either text, tokenized by the run, or token ids: list only one kind (a phase's "
            "data_config.paths may switch to the other)",
            text[0],
        )
    digest = hashlib.blake2b(b"token-files\0", digest_size=16)
    for path in files:
        digest.update(f"{path.resolve()}\0{identity_fingerprint(path)}\0".encode())
    names = tuple(str(f) for f in files)
    return CorpusSource(name, names, digest.hexdigest(), token_files=names,
                        stored_bytes=sum(os.stat(f).st_size for f in files))


def describe(paths: Sequence[str]) -> str:
    """A short label for a list of paths, for messages."""
    shown = ", ".join(str(p) for p in paths[:3])
    return shown if len(paths) <= 3 else f"{shown}, ... ({len(paths)} paths)"


def _expand(path_str: str, include: Sequence[str] | None = None) -> list[Path]:
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
    if include is None:
        found = (f for f in path.rglob("*") if formats.in_folder_walk(f))
    else:
        found = (f for pattern in include for f in _glob(path, pattern))
    files = sorted(
        {f for f in found if _wanted(f, path)}, key=lambda f: f.relative_to(path).as_posix()
    )
    if not files:
        if include is None:
            looked = (f"looked recursively for {formats.folder_suffixes()}, skipping hidden ones; .bin token "
                      "files are read only when listed or matched by data.include")
            fix = "add corpus files, list the files in data.paths, or set data.include (e.g. ['**/*.py'])"
        else:
            looked = f"no file matches data.include {list(include)}, hidden ones skipped"
            fix = "fix data.include (patterns are relative to the folder; '**/' reaches into subfolders)"
        raise DataError(f"data.paths: folder {path} holds no corpus files ({looked}); {fix}", path)
    return files


def _glob(root: Path, pattern: str) -> list[Path]:
    if not pattern or Path(pattern).is_absolute() or ".." in Path(pattern).parts:
        raise DataError(f"data.include: pattern {pattern!r} must be a non-empty path pattern relative to each "
                        f"folder in data.paths (such as '*.py' or '**/*.md'), without '..'")
    try:
        return list(root.glob(pattern))
    except ValueError as err:
        raise DataError(f"data.include: pattern {pattern!r} is not a glob pattern ({err})") from None


def _wanted(file: Path, root: Path) -> bool:
    parts = file.relative_to(root).parts
    if any(part.startswith(".") for part in parts):
        return False  # .git, .DS_Store and editor swap files are not corpus text
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


# --------------------------------------------------------------------------------------------
# splitting


def document_score(text: str) -> float:
    """A stable number in [0, 1) derived from the document's content.

    Content, not position or file name, is the document's identity: moving or renaming files
    keeps every document in its split, and exact duplicates always land in the same split.
    """
    return score_of(hashlib.blake2b(text.encode("utf-8"), digest_size=8, person=b"stackwise-split"))


def score_of(digest: Any) -> float:
    """[0, 1) from an 8-byte blake2b (person "stackwise-split") fed a document's content."""
    return int.from_bytes(digest.digest(), "big") / 2.0**64


def assign_validation(scores: Sequence[float] | np.ndarray, val_fraction: float) -> np.ndarray:
    """Which documents go to validation: those scoring below `val_fraction`, with at least one
    document on each side (see `split_corpus`)."""
    scores = np.asarray(scores, dtype=np.float64)
    in_val = scores < val_fraction
    if not in_val.any():
        in_val = scores == scores.min()
    if in_val.all():
        in_val = scores != scores.max()
        if not in_val.any():  # every document has the same content
            in_val[-1] = True
    return in_val


def split_corpus(corpus: Corpus, val_fraction: float) -> CorpusSplit:
    """Deterministic train/validation split by document.

    A document goes to validation when `document_score(text) < val_fraction`. Both splits always
    get at least one document: if none scored low enough the lowest-scoring one moves to
    validation; if all did, the highest-scoring one moves back to train. A corpus of one
    document is split inside it instead: its last ceil(val_fraction · characters) characters
    are the validation text. `val_fraction` ≥ 1 puts every document in validation (what scoring a
    whole corpus, `stackwise eval --data`, needs).
    """
    if corpus.token_files:
        raise ValueError("a token corpus is split by the token cache (token_files.write_token_splits)")
    texts = [d.text for d in corpus.documents]
    if val_fraction >= 1:
        return _make_split([], texts, "all-validation")
    if len(texts) == 1:
        text = texts[0]
        cut = len(text) - max(1, math.ceil(len(text) * val_fraction))
        return _make_split([text[:cut]], [text[cut:]], "single-document-tail")
    in_val = assign_validation([document_score(t) for t in texts], val_fraction).tolist()
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
