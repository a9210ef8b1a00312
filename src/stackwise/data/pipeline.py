"""Preparing a corpus, one way: documents → tokens → shards → windows.

| stage | module | what it does |
|---|---|---|
| documents | `corpus` (files), `formats` (reading), `documents` (plan) | streams each file's documents; one pass decides the split, the byte counts and the tokenizer's sample |
| tokens | `tokenizer`, `tokens` | trains BPE on the streamed sample (or loads a tokenizer); encodes documents in batches on all cores |
| shards | `token_cache` | appends the ids to `train.bin` / `val.bin` of a cache entry published atomically, keyed by everything they depend on |
| windows | `stackwise.training.loader` | serves fixed windows of the memory-mapped shards, per phase |

Memory is flat in the corpus size: one file chunk, one document (≤ 256 KiB) and one encoding batch
(~2 MiB of text) at a time, 12 bytes per document for the plan, and the BPE trainer's word
counts over a sample of at most `data.tokenizer.train_bytes`. Each stage runs only when its
output is not cached: a second run (or every run after `stackwise prepare CONFIG`) hashes the
corpus files and maps the shards.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from stackwise.data import formats
from stackwise.data.corpus import SPLIT_RULE, CorpusSource
from stackwise.data.documents import DocumentPlan, plan_documents, sample_documents
from stackwise.data.errors import DataError
from stackwise.data.progress import Progress
from stackwise.data.token_cache import TokenSplits, load_token_splits
from stackwise.data.tokenizer import BPE_RECIPE, ByteTokenizer, Tokenizer, cached_bpe, load_tokenizer

log = logging.getLogger(__name__)

TRAINING_PIECE = 1 << 16  # characters of text handed to the BPE trainer at a time


@dataclass
class CorpusTokenizer:
    """The run's tokenizer, and the document plan of the corpus it was trained on (when training
    it needed one: the shards stage then reuses it instead of reading the corpus again)."""

    tokenizer: Tokenizer
    plan: DocumentPlan | None = None


def corpus_tokenizer(source: CorpusSource | None, *, kind: str, vocab_size: int, path: str | None, train_bytes: int,
                     val_fraction: float, cache_dir: Path, progress: bool = True) -> CorpusTokenizer:
    """`data.tokenizer`: the file at `path`, the byte tokenizer, or BPE trained on a sample of at
    most `train_bytes` of `source`'s training split (cached under a key of the corpus fingerprint,
    the split and the sample budget). `source` may be None when no BPE is to be trained."""
    if path:
        return CorpusTokenizer(load_tokenizer(path))
    if kind == "byte":
        return CorpusTokenizer(ByteTokenizer())
    if source is None:
        raise ValueError("training a BPE tokenizer needs the corpus source")
    if source.token_files:
        raise DataError(f"{source.name}: token files (.bin) need the tokenizer that wrote them: set "
                        "data.tokenizer.path to its tokenizer.json", source.token_files[0])
    result = CorpusTokenizer(ByteTokenizer())  # replaced below

    def sample() -> Iterator[str]:
        # Runs only on a cache miss: the plan's pass is the first read of the corpus.
        result.plan = plan_documents(source, val_fraction, train_bytes, progress)
        log.info("training BPE-%d on %.1f MB of %s (%d of %d training documents)", vocab_size,
                 result.plan.sample_bytes / 1e6, source.name, int(result.plan.in_sample.sum()),
                 result.plan.n_train_documents)
        texts = _counted(sample_documents(source, result.plan), result.plan.sample_bytes, progress,
                         f"training BPE-{vocab_size}")
        yield from (piece for text in texts for piece in _training_pieces(text))

    result.tokenizer = cached_bpe(vocab_size, bpe_key(source, vocab_size, val_fraction, train_bytes), sample, cache_dir)
    return result


def bpe_key(source: CorpusSource, vocab_size: int, val_fraction: float, train_bytes: int) -> str:
    """Everything a BPE trained on a corpus sample depends on."""
    import tokenizers

    parts = [BPE_RECIPE, tokenizers.__version__, str(vocab_size), SPLIT_RULE, str(formats.max_document_bytes),
             source.fingerprint, source.text_field, repr(float(val_fraction)), str(train_bytes), "sample-v1"]
    return hashlib.blake2b("\0".join(parts).encode(), digest_size=16).hexdigest()


def prepare_tokens(source: CorpusSource, tokenizer: Tokenizer, *, val_fraction: float, cache_dir: Path,
                   bin_dtype: str = "auto", plan: DocumentPlan | None = None, progress: bool = True) -> TokenSplits:
    """The shards of `source` under `tokenizer`: mapped from the cache, or prepared (stages
    documents → tokens → shards) on a miss."""
    return load_token_splits(source, tokenizer, val_fraction=val_fraction, text_field=source.text_field,
                             cache_dir=cache_dir, plan=plan, bin_dtype=bin_dtype, progress=progress)


def _training_pieces(text: str) -> Iterator[str]:
    """A document cut at line ends into pieces of at most ~64 K characters for the BPE trainer:
    it buffers 256 texts at a time and keeps per-byte offsets for each, so 256 KiB documents would
    cost hundreds of MB. Words never span a line end under the byte-level pre-tokenizer's regex
    except runs of whitespace, so the counts barely change."""
    start = 0
    while len(text) - start > TRAINING_PIECE:
        cut = text.rfind("\n", start, start + TRAINING_PIECE) + 1 or start + TRAINING_PIECE
        yield text[start:cut]
        start = cut
    yield text[start:]


def _counted(texts: Iterator[str], total: int, progress: bool, label: str) -> Iterator[str]:
    with Progress(label, total, enabled=progress) as report:
        for text in texts:
            report.advance(len(text.encode("utf-8")))
            yield text
