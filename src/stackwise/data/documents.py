"""Pipeline stage 1, documents: one streaming pass over a corpus decides each document's split
and which documents train the tokenizer.

`plan_documents` reads every document once (memory: one file chunk and one document at a
time, plus 12 bytes per document) and returns a `DocumentPlan`: the train/validation split by
content hash (`corpus.assign_validation`, the same rule as `split_corpus`), each document's
exact UTF-8 byte count (bits per byte needs them) and a deterministic sample of the training
split, bounded by `data.tokenizer.train_bytes`, to train BPE on. Later stages stream the
documents again in the same order (`split_documents`, `sample_documents`): reading is
deterministic, so document i of one pass is document i of the next.

The sample: training documents ordered by a second number taken from the same content hash,
taken in that order while their bytes fit the budget. It depends on the documents' contents
only (not on file order), spreads over the whole corpus, and is the whole training split when
that fits the budget.
"""

from __future__ import annotations

import hashlib
import math
from array import array
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np

from stackwise.data import formats
from stackwise.data.corpus import CorpusSource, Document, assign_validation, empty_corpus
from stackwise.data.errors import DataError
from stackwise.data.progress import Progress


@dataclass(frozen=True)
class DocumentPlan:
    """Where every document of a corpus goes, decided from one pass over it."""

    in_val: np.ndarray  # bool per document, in corpus order
    n_bytes: np.ndarray  # int64 UTF-8 bytes per document
    in_sample: np.ndarray  # bool per document: trains the BPE tokenizer
    rule: str  # "by-document", "single-document-tail" or "all-validation"
    train_bytes: int
    val_bytes: int
    single: tuple[str, str] | None = None  # a one-document corpus: its (train, validation) parts
    replacements: dict[str, int] = field(default_factory=dict)

    @property
    def n_documents(self) -> int:
        return len(self.in_val)

    @property
    def n_val_documents(self) -> int:
        return 1 if self.single else int(self.in_val.sum())

    @property
    def n_train_documents(self) -> int:
        return 1 if self.single else self.n_documents - int(self.in_val.sum())

    @property
    def sample_bytes(self) -> int:
        if self.single:
            return len(self.single[0].encode("utf-8"))
        return int(self.n_bytes[self.in_sample].sum())


def plan_documents(source: CorpusSource, val_fraction: float, sample_budget: int = 0,
                   progress: bool = False) -> DocumentPlan:
    """One pass over `source`: the split (`val_fraction` ≥ 1: every document validation), the byte
    counts and the tokenizer sample of at most `sample_budget` bytes (at least one document; none
    for a budget of 0).
    `progress`: report the pass on stderr (data.progress)."""
    with Progress(f"reading {source.name}", source.text_bytes_estimate, enabled=progress) as reading:
        return _plan(source, val_fraction, sample_budget, reading)


def _plan(source: CorpusSource, val_fraction: float, sample_budget: int, progress: Progress) -> DocumentPlan:
    # 12 bytes per document: its content hash (the split score is its big-endian reading, the
    # sample key the same bits byte-swapped) and its size (at most formats.max_document_bytes).
    digests, sizes = array("Q"), array("I")
    first: str | None = None
    stats = formats.FileStats()
    for doc in source.documents(stats):
        data = doc.text.encode("utf-8")
        digests.append(int.from_bytes(hashlib.blake2b(data, digest_size=8, person=b"stackwise-split").digest(), "big"))
        sizes.append(len(data))
        if first is None:
            first = doc.text
        progress.advance(len(data))
    if not sizes:
        raise empty_corpus(source)
    if val_fraction < 1 and len(sizes) == 1:
        return _single_document(first or "", val_fraction, stats.replacements)
    digest = np.frombuffer(digests, dtype=np.uint64)
    n_bytes = np.frombuffer(sizes, dtype=np.uint32).astype(np.int64)
    if val_fraction >= 1:
        in_val, rule = np.ones(len(sizes), dtype=bool), "all-validation"
    else:
        # score_of: the digest as a big-endian integer over 2^64 (the same float as the in-memory split)
        in_val, rule = assign_validation(digest.astype(np.float64) / 2.0**64, val_fraction), "by-document"
    in_sample = _sample(digest.byteswap(), n_bytes, ~in_val, sample_budget)
    return DocumentPlan(in_val, n_bytes, in_sample, rule, int(n_bytes[~in_val].sum()), int(n_bytes[in_val].sum()),
                        replacements=stats.replacements)


def _single_document(text: str, val_fraction: float, replacements: dict[str, int]) -> DocumentPlan:
    # One document (at most formats.max_document_bytes): its tail is the validation text.
    cut = len(text) - max(1, math.ceil(len(text) * val_fraction))
    train, val = text[:cut], text[cut:]
    return DocumentPlan(np.zeros(1, dtype=bool), np.array([len(text.encode())], dtype=np.int64),
                        np.ones(1, dtype=bool), "single-document-tail", len(train.encode()), len(val.encode()),
                        single=(train, val), replacements=replacements)


def _sample(keys: np.ndarray, n_bytes: np.ndarray, train: np.ndarray, budget: int) -> np.ndarray:
    """Training documents in key order while their bytes fit `budget` (at least one; none when
    the budget is 0)."""
    chosen = np.zeros(len(keys), dtype=bool)
    candidates = np.flatnonzero(train)
    if candidates.size == 0 or budget <= 0:  # no sample wanted (the shards stage alone)
        return chosen
    order = candidates[np.argsort(keys[candidates], kind="stable")]
    within = np.cumsum(n_bytes[order]) <= budget
    within[0] = True
    chosen[order[within]] = True
    return chosen


def split_documents(source: CorpusSource, plan: DocumentPlan) -> Iterator[tuple[str, bool, int]]:
    """(text, goes to validation, UTF-8 bytes) for every document, in corpus order, as `plan`
    decided."""
    if plan.single:
        yield plan.single[0], False, plan.train_bytes
        yield plan.single[1], True, plan.val_bytes
        return
    in_val, n_bytes = plan.in_val, plan.n_bytes
    for i, doc in enumerate(_checked(source, plan)):
        yield doc.text, bool(in_val[i]), int(n_bytes[i])


def sample_documents(source: CorpusSource, plan: DocumentPlan) -> Iterator[str]:
    """The texts of the tokenizer sample, in corpus order."""
    if plan.single:
        yield plan.single[0]
        return
    in_sample = plan.in_sample
    for i, doc in enumerate(_checked(source, plan)):
        if in_sample[i]:
            yield doc.text


def _checked(source: CorpusSource, plan: DocumentPlan) -> Iterator[Document]:
    """The documents again; a corpus that changed since it was planned is an error, not a
    silently wrong split."""
    n = 0
    for doc in source.documents(formats.FileStats(), warn=False):  # the plan's pass warned
        if n >= plan.n_documents:
            break
        yield doc
        n += 1
    if n != plan.n_documents:
        raise DataError(f"{source.name}: the corpus changed while it was being prepared ({plan.n_documents} "
                        f"documents planned, {n} found); prepare it again once the files stay put")
