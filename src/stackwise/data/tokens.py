"""Pipeline stage 2, tokens: documents encoded in batches on all cores and appended to the
train and validation token streams as they come.

A batch holds about `BATCH_BYTES` of text (documents are at most 256 KiB: formats.cut_pieces), so
memory stays flat whatever the corpus size, while `tokenizers`' batch encoder keeps every core
busy (it runs in Rust threads, outside the GIL). Each document's ids are followed by [EOS].
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import numpy as np

from stackwise.data.progress import Progress
from stackwise.data.tokenizer import Tokenizer

BATCH_BYTES = 1 << 21  # text encoded per call: large enough for the encoder's threads, small in memory
BATCH_DOCUMENTS = 4096


@dataclass
class TokenStream:
    """One split's token file being written: its handle, count and running checksum."""

    out: BinaryIO
    tokens: int = 0
    digest: Any = field(default_factory=hashlib.sha256)
    decoded_bytes: int = 0  # the UTF-8 bytes the written ids decode to (bits per byte relies on it)

    def write(self, ids: np.ndarray, tokenizer: Tokenizer | None = None) -> None:
        """Append `ids`, which start at a document's first token when `tokenizer` is given (their
        decoded bytes are then counted)."""
        self.out.write(ids.data)
        self.digest.update(ids.data)
        self.tokens += ids.size
        if tokenizer is not None:
            self.decoded_bytes += tokenizer.count_bytes(ids, opens_document=True)


def encode_documents(documents: Iterable[tuple[str, bool, int]], tokenizer: Tokenizer,
                     streams: tuple[TokenStream, TokenStream], dtype: np.dtype,
                     progress: Progress | None = None) -> None:
    """Append the ids of each (text, goes to validation, UTF-8 bytes) document, then [EOS], to
    `streams[1]` (validation) or `streams[0]` (train), in order."""
    for batch, size in _batches(documents):
        _encode_batch(batch, tokenizer, streams, dtype)
        if progress is not None:
            progress.advance(size)


def _batches(documents: Iterable[tuple[str, bool, int]]) -> Iterator[tuple[list[tuple[str, bool]], int]]:
    """(texts with their split, their bytes) of about BATCH_BYTES (at most BATCH_DOCUMENTS) each."""
    batch: list[tuple[str, bool]] = []
    size = 0
    for text, in_val, n_bytes in documents:
        batch.append((text, in_val))
        size += n_bytes
        if size >= BATCH_BYTES or len(batch) >= BATCH_DOCUMENTS:
            yield batch, size
            batch, size = [], 0
    if batch:
        yield batch, size


def _encode_batch(batch: list[tuple[str, bool]], tokenizer: Tokenizer, streams: tuple[TokenStream, TokenStream],
                  dtype: np.dtype) -> None:
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    parts: tuple[list[np.ndarray], list[np.ndarray]] = ([], [])
    for (_, in_val), ids in zip(batch, tokenizer.encode_arrays([text for text, _ in batch]), strict=True):
        parts[in_val].extend((ids.astype(dtype, copy=False), eos))
    for stream, arrays in zip(streams, parts, strict=True):
        if arrays:
            stream.write(np.concatenate(arrays), tokenizer)
