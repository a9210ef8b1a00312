"""The forms a corpus file can take, and how each is read.

A file's form follows from its name (case-insensitive):

| name | form | documents |
|---|---|---|
| `*.parquet` | Apache Parquet (needs pyarrow: `pip install 'stackwise[parquet]'`) | one per row of the `data.text_field` column, read in record batches |
| `*.bin`, `*.u16.bin`, `*.u32.bin` | token ids as nanoGPT's `prepare.py` writes them (no header) | separated by the tokenizer's [EOS] id; see `stackwise.data.token_files` |
| `*.jsonl`, `*.jsonl.gz`, `*.jsonl.zst` | JSON lines | one per non-blank line, from its `data.text_field` |
| anything else, `*.gz`, `*.zst` | UTF-8 text | the whole (decompressed) file |

`.gz` is read with the standard library, `.zst` with zstandard (`pip install 'stackwise[zstd]'`);
both are streamed: JSON lines are decoded one line at a time, never the whole file at once.

`iter_records` streams a file's (text, source) records, one chunk of the file in memory at a
time; a document larger than `max_document_bytes` (256 KiB) is cut into several at blank lines
(`cut_pieces`). `file_digest` hashes a file's stored bytes, from which the corpus fingerprint is
made; corpus.py turns records into documents.
"""

from __future__ import annotations

import hashlib
import importlib
import itertools
import json
import re
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

from stackwise.data.errors import DataError
from stackwise.data.files import open_regular

TEXT_SUFFIXES = frozenset({".txt", ".md", ".text", ""})
JSONL_SUFFIX = ".jsonl"
PARQUET_SUFFIX = ".parquet"
TOKEN_SUFFIX = ".bin"
TOKEN_DTYPE_SUFFIXES = {".u16": "uint16", ".u32": "uint32"}  # data.u32.bin
COMPRESSIONS = {".gz": "gzip", ".zst": "zstd"}
# What a folder walk reads when data.include is not set. Token files are never picked up by a
# walk (a nanoGPT data folder holds train.bin next to val.bin and a readme): list them, or
# match them with data.include.
FOLDER_SUFFIXES = (".txt", ".md", ".text", ".jsonl", ".parquet",
                   ".txt.gz", ".txt.zst", ".md.gz", ".md.zst", ".jsonl.gz", ".jsonl.zst")
_COMPRESSED_INNER = frozenset({".txt", ".md", ".text", JSONL_SUFFIX})
EXTRA_HINT = {"pyarrow": "pip install 'stackwise[parquet]'", "zstandard": "pip install 'stackwise[zstd]'"}

_READ_SIZE = 1 << 18  # bytes read at a time: bounds what one decompression call makes
_HASH_READ = 1 << 20  # bytes read at a time when hashing a file
_ZSTD_FEED = 1 << 14  # compressed bytes handed to zstd at a time (its output has no cap)
# A document larger than this is cut into several (`cut_pieces`): `tokenizers` keeps about 125
# bytes of offsets per byte of a document while encoding it, so one 100 MB text file read as one
# document would need 12 GB, and 1 MiB documents cost 130 MB each per encoding thread. 256 KiB
# (~60k tokens, several windows of any usual seq_len) keeps that near 30 MB per thread. Part of
# every cache key (token_cache.cache_key).
max_document_bytes = 1 << 18
_PARQUET_BATCH_ROWS = 1024  # rows decoded at a time
_SURROGATE = re.compile("[\ud800-\udfff]")
_REPLACEMENT_BYTES = "\ufffd".encode()
_FIX = "list regular text, .jsonl, .parquet or .bin files (or folders of them)"


@dataclass(frozen=True)
class FileFormat:
    kind: str  # "text", "jsonl", "parquet" or "tokens"
    compression: str | None = None  # "gzip", "zstd" or None
    dtype: str | None = None  # tokens: "uint16" / "uint32" when the name says (data.u32.bin)


def file_format(path: Path) -> FileFormat:
    """The form of a corpus file, from its name."""
    name = path.name.lower()
    suffix = Path(name).suffix
    compression = COMPRESSIONS.get(suffix)
    stem = name[: -len(suffix)] if compression else name
    inner = Path(stem).suffix
    if inner in (PARQUET_SUFFIX, TOKEN_SUFFIX) and compression:
        raise DataError(f"data.paths: {path} is a compressed {inner} file; decompress it first "
                        f"({inner} files are read in place, not streamed)", path)
    if inner == PARQUET_SUFFIX:
        return FileFormat("parquet")
    if inner == TOKEN_SUFFIX:
        return FileFormat("tokens", dtype=TOKEN_DTYPE_SUFFIXES.get(Path(Path(stem).stem).suffix))
    return FileFormat("jsonl" if inner == JSONL_SUFFIX else "text", compression)


def in_folder_walk(path: Path) -> bool:
    """Whether a folder walk without data.include reads this file (by its name)."""
    name = path.name.lower()
    suffix = Path(name).suffix
    if suffix in COMPRESSIONS:
        return Path(name[: -len(suffix)]).suffix in _COMPRESSED_INNER
    return suffix in TEXT_SUFFIXES or suffix in (JSONL_SUFFIX, PARQUET_SUFFIX)


def folder_suffixes() -> str:
    """The suffixes a folder walk reads, for messages."""
    return ", ".join(FOLDER_SUFFIXES) + " and suffix-less files"


@dataclass
class FileStats:
    """What reading files has counted so far (filled in as records stream by)."""

    replacements: dict[str, int] = field(default_factory=dict)  # file -> invalid UTF-8 sequences replaced

    def add(self, path: Path, n: int) -> None:
        if n:
            self.replacements[str(path)] = self.replacements.get(str(path), 0) + n


def iter_records(path: Path, text_field: str, stats: FileStats | None = None) -> Iterator[tuple[str, str]]:
    """Every document of a text, JSON-lines or parquet file (plain or compressed), as (text,
    source), read as a stream: memory holds one chunk of the file (and one document) at a time.
    A text file larger than `max_document_bytes` is cut into several documents (`cut_pieces`).
    Invalid UTF-8 is replaced and counted in `stats`."""
    stats = stats if stats is not None else FileStats()
    fmt = file_format(path)
    if fmt.kind == "parquet":
        yield from _parquet_records(path, text_field, stats)
        return
    if fmt.kind == "tokens":
        raise ValueError(f"{path} is a token file, not text")  # corpus.py never asks
    with open_regular(path, "data.paths", _FIX) as raw:
        chunks = _raw_chunks(raw, path)
        if fmt.compression is not None:
            chunks = _decompressed(chunks, fmt.compression, path)
        if fmt.kind == "jsonl":
            yield from _jsonl_records(_split_lines(chunks), path, text_field, stats)
        else:
            yield from _text_records(chunks, path, stats)


def file_digest(path: Path) -> tuple[bytes, int]:
    """blake2b-16 of the file's bytes as stored (compressed, for .gz/.zst) and its size, read in
    chunks: what the corpus fingerprint is made of."""
    digest, size = hashlib.blake2b(digest_size=16), 0
    with open_regular(path, "data.paths", _FIX) as raw:
        for chunk in _raw_chunks(raw, path, _HASH_READ):
            digest.update(chunk)
            size += len(chunk)
    return digest.digest(), size


# ---- text and JSON lines --------------------------------------------------------------------


def decode_utf8(data: bytes, bom: bool = True) -> tuple[str, int]:
    """UTF-8 text (a leading BOM dropped when `bom`) and the number of invalid byte sequences
    replaced by U+FFFD."""
    codec = "utf-8-sig" if bom else "utf-8"
    try:
        return data.decode(codec), 0
    except UnicodeDecodeError:
        text = data.decode(codec, errors="replace")
        # Each invalid sequence becomes one U+FFFD; genuine U+FFFD characters in the file are not counted.
        return text, text.count("\ufffd") - data.count(_REPLACEMENT_BYTES)


def _text_records(chunks: Iterator[bytes], path: Path, stats: FileStats) -> Iterator[tuple[str, str]]:
    cut = cut_pieces(chunks)
    pieces = list(itertools.islice(cut, 2))  # a single piece is the whole file, named as before
    if len(pieces) < 2:
        for data in pieces:
            text, bad = decode_utf8(data)
            stats.add(path, bad)
            if text.strip():
                yield text, str(path)
        return
    for number, data in enumerate(itertools.chain(pieces, cut), start=1):
        text, bad = decode_utf8(data, bom=number == 1)
        stats.add(path, bad)
        if text.strip():
            yield text, f"{path}#{number}"


def cut_pieces(chunks: Iterator[bytes], cap: int | None = None) -> Iterator[bytes]:
    """The bytes of a stream cut into documents of at most `cap` bytes (default
    `max_document_bytes`): at the last blank line before the cap, else the last line end, else
    the last UTF-8 character boundary. A stream no longer than the cap is one piece; joined, the
    pieces give the stream back."""
    cap = cap or max_document_bytes
    pending = bytearray()
    for chunk in chunks:
        pending += chunk
        while len(pending) > cap:
            cut = _cut_point(pending, cap)
            yield bytes(pending[:cut])
            del pending[:cut]
    if pending:
        yield bytes(pending)


def _cut_point(data: bytearray, cap: int) -> int:
    """Where to end a document that may take `data[:cap]`: after a blank line (LF or CRLF), a
    line end, or at a UTF-8 character boundary (never inside a character); always > 0."""
    blank = max(data.rfind(b"\n\n", 0, cap), data.rfind(b"\n\r\n", 0, cap))
    if blank > 0:
        return data.index(b"\n", blank + 1) + 1
    line = data.rfind(b"\n", 0, cap)
    if line > 0:
        return line + 1
    cut = cap
    # A UTF-8 character has at most 3 continuation bytes: back up to its start (invalid bytes
    # are not characters, so never further than that).
    while cut > cap - 3 and (data[cut] & 0xC0) == 0x80:
        cut -= 1
    return cut


def cut_text(text: str, source: str) -> Iterator[tuple[str, str]]:
    """A document (a JSON line, a parquet row) cut like a text file when its UTF-8 exceeds
    `max_document_bytes`; the pieces keep the source, numbered."""
    if len(text) * 4 <= max_document_bytes or len(data := text.encode("utf-8")) <= max_document_bytes:
        yield text, source
        return
    for number, piece in enumerate(cut_pieces(iter((data,))), start=1):
        text = piece.decode("utf-8")  # cut at character boundaries: valid
        if text.strip():  # a whitespace-only piece is dropped, as whitespace-only documents are
            yield text, f"{source}#{number}"


def _split_lines(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """Lines (split at b"\\n", without it) of a stream of byte chunks, the last one even if empty."""
    pending: list[bytes] = []
    for chunk in chunks:
        if b"\n" not in chunk:
            pending.append(chunk)
            continue
        parts = chunk.split(b"\n")
        pending.append(parts[0])
        yield b"".join(pending)
        yield from parts[1:-1]
        pending = [parts[-1]]
    yield b"".join(pending)


def _jsonl_records(lines: Iterator[bytes], path: Path, text_field: str, stats: FileStats
                   ) -> Iterator[tuple[str, str]]:
    for number, raw in enumerate(lines, start=1):
        line, n = decode_utf8(raw, bom=number == 1)
        stats.add(path, n)
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
            stats.add(path, n)
        if value.strip():
            yield from cut_text(value, f"{path}:{number}")


def _field_problem(path: Path, number: int, record: object, text_field: str) -> str:
    where = f"{path} line {number}"
    if not isinstance(record, dict):
        return f"{where}: expected a JSON object with a '{text_field}' field, got {type(record).__name__}"
    if text_field not in record:
        keys = ", ".join(repr(k) for k in list(record)[:8]) or "none"
        return f"{where}: no '{text_field}' field (keys: {keys}); set data.text_field to the key that holds the text"
    return f"{where}: field '{text_field}' must be a string, got {type(record[text_field]).__name__}"


# ---- compression ----------------------------------------------------------------------------


def _raw_chunks(raw: BinaryIO, path: Path, size: int = _READ_SIZE) -> Iterator[bytes]:
    """The file's bytes in chunks of `size`."""
    while True:
        try:
            chunk = raw.read(size)
        except OSError as err:
            raise DataError(f"data.paths: cannot read {path} ({err.strerror})", path) from None
        if not chunk:
            return
        yield chunk


def require(module: str, path: Path, what: str) -> Any:
    """Import an optional dependency, or a DataError naming the file and the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError:
        top = module.split(".")[0]
        raise DataError(f"{path}: reading {what} needs the optional package {top}: "
                        f"{EXTRA_HINT.get(top, f'pip install {top}')}", path) from None


def _decoder_factory(compression: str, path: Path) -> tuple[Callable[[], Any], tuple[type[BaseException], ...], str]:
    if compression == "gzip":
        return (lambda: zlib.decompressobj(16 + zlib.MAX_WBITS)), (zlib.error,), "gzip"
    zstd = require("zstandard", path, ".zst files")
    context = zstd.ZstdDecompressor(max_window_size=2**31)  # frames written with --long=31 too
    return context.decompressobj, (zstd.ZstdError,), "zstd"


def _decompressed(chunks: Iterator[bytes], compression: str, path: Path) -> Iterator[bytes]:
    """Decompress a stream of one or more gzip members / zstd frames; a truncated or damaged file
    is a DataError naming it (never silently shorter). Output comes in bounded pieces: gzip's at
    most `_READ_SIZE` bytes each; zstd's from at most `_ZSTD_FEED` input bytes each (zstd's API
    here has no output cap; text and JSON compress 3-10×, so that is ~100 KiB-1 MiB)."""
    new, errors, name = _decoder_factory(compression, path)
    feed = _ZSTD_FEED if compression == "zstd" else _READ_SIZE
    decoder, fed = new(), False
    try:
        for chunk in chunks:
            for start in range(0, len(chunk), feed):
                data = chunk[start:start + feed]
                while data:
                    fed = True
                    if compression == "gzip":
                        out = decoder.decompress(data, _READ_SIZE)
                        pending = decoder.unconsumed_tail  # input held back by the output cap
                    else:
                        out, pending = decoder.decompress(data), b""
                    if out:
                        yield out
                    if decoder.eof:  # end of a member / frame: another may follow
                        data = decoder.unused_data
                        decoder, fed = new(), False
                    else:
                        data = pending
    except errors as err:
        raise DataError(f"{path}: not a valid {name} file ({err}); check the file or drop its .{_ext(compression)} "
                        "suffix if it is not compressed", path) from None
    if fed:
        raise DataError(f"{path}: the {name} stream ends early (the file is truncated); download or "
                        "write it again", path)


def _ext(compression: str) -> str:
    return "gz" if compression == "gzip" else "zst"


# ---- parquet --------------------------------------------------------------------------------


def _parquet_records(path: Path, text_field: str, stats: FileStats) -> Iterator[tuple[str, str]]:
    pq = require("pyarrow.parquet", path, "parquet files")
    pa = require("pyarrow", path, "parquet files")
    with open_regular(path, "data.paths", _FIX) as f:
        try:
            parquet = pq.ParquetFile(f)
            schema = parquet.schema_arrow
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{path}: not a parquet file ({err}); check the file, or rename it if it holds "
                            "something else", path) from None
        if text_field not in schema.names:
            shown = ", ".join(repr(n) for n in schema.names[:20]) or "none"
            raise DataError(f"{path}: no '{text_field}' column (columns: {shown}); set data.text_field to "
                            "the column that holds the text", path)
        kind = schema.field(text_field).type
        value_type = kind.value_type if pa.types.is_dictionary(kind) else kind
        if not (pa.types.is_string(value_type) or pa.types.is_large_string(value_type)
                or str(value_type) == "string_view"):
            raise DataError(f"{path}: column '{text_field}' holds {kind}, not strings; set data.text_field "
                            "to a text column", path)
        row = 0
        try:
            for batch in parquet.iter_batches(batch_size=_PARQUET_BATCH_ROWS, columns=[text_field]):
                column = batch.column(0)
                if pa.types.is_dictionary(column.type):
                    column = column.dictionary_decode()
                if column.null_count:
                    first = next(i for i, v in enumerate(column.is_valid().to_pylist()) if not v)
                    raise DataError(f"{path} row {row + first + 1}: column '{text_field}' is null, not a string; "
                                    "drop the row or fill it", path)
                # As bytes: a value that is not valid UTF-8 is replaced and counted, as in text files.
                for i, value in enumerate(column.cast(pa.large_binary()).to_pylist()):
                    text, n = decode_utf8(value, bom=False)
                    stats.add(path, n)
                    if text.strip():
                        yield from cut_text(text, f"{path}:{row + i + 1}")
                row += len(column)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{path}: cannot read row group data near row {row + 1} ({err}); the file is "
                            "damaged", path) from None
