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

Readers return (text, source) records and a digest of the file's stored bytes, from which the
corpus fingerprint is made; corpus.py turns records into documents.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import re
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from stackwise.data.errors import DataError
from stackwise.data.files import open_regular, read_regular

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

_READ_SIZE = 1 << 18  # compressed bytes read at a time: bounds what one decompression call makes
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
class FileText:
    """What reading one text-bearing file gives."""

    records: list[tuple[str, str]]  # (text, source) per document, in file order
    replacements: int  # invalid UTF-8 sequences (and lone surrogates) replaced by U+FFFD
    digest: bytes  # blake2b-16 of the file's bytes as stored (compressed, for .gz/.zst)
    size: int  # bytes as stored


def read_text_file(path: Path, text_field: str) -> FileText:
    """Every document of a text, JSON-lines or parquet file (plain or compressed)."""
    fmt = file_format(path)
    if fmt.kind == "parquet":
        return _read_parquet(path, text_field)
    if fmt.kind == "tokens":
        raise ValueError(f"{path} is a token file, not text")  # corpus.py never asks
    if fmt.compression is None:
        data = read_regular(path, "data.paths", _FIX)
        digest = hashlib.blake2b(data, digest_size=16).digest()
        if fmt.kind == "jsonl":
            records, bad = _jsonl_records(_text_lines(data), path, text_field)
        else:
            records, bad = _text_records(data, path)
        return FileText(records, bad, digest, len(data))
    digest = hashlib.blake2b(digest_size=16)
    with open_regular(path, "data.paths", _FIX) as raw:
        size = [0]
        chunks = _decompressed(_raw_chunks(raw, digest, size, path), fmt.compression, path)
        if fmt.kind == "jsonl":
            records, bad = _jsonl_records(_split_lines(chunks), path, text_field)
        else:
            records, bad = _text_records(b"".join(chunks), path)
    return FileText(records, bad, digest.digest(), size[0])


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


def _text_records(data: bytes, path: Path) -> tuple[list[tuple[str, str]], int]:
    text, bad = decode_utf8(data)
    return ([(text, str(path))] if text.strip() else []), bad


def _text_lines(data: bytes) -> Iterator[bytes]:
    yield from data.split(b"\n")  # UTF-8 never has 0x0A inside a character: same as splitting the text


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


def _jsonl_records(lines: Iterator[bytes], path: Path, text_field: str) -> tuple[list[tuple[str, str]], int]:
    records, bad = [], 0
    for number, raw in enumerate(lines, start=1):
        line, n = decode_utf8(raw, bom=number == 1)
        bad += n
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
            records.append((value, f"{path}:{number}"))
    return records, bad


def _field_problem(path: Path, number: int, record: object, text_field: str) -> str:
    where = f"{path} line {number}"
    if not isinstance(record, dict):
        return f"{where}: expected a JSON object with a '{text_field}' field, got {type(record).__name__}"
    if text_field not in record:
        keys = ", ".join(repr(k) for k in list(record)[:8]) or "none"
        return f"{where}: no '{text_field}' field (keys: {keys}); set data.text_field to the key that holds the text"
    return f"{where}: field '{text_field}' must be a string, got {type(record[text_field]).__name__}"


# ---- compression ----------------------------------------------------------------------------


def _raw_chunks(raw: BinaryIO, digest: Any, size: list[int], path: Path) -> Iterator[bytes]:
    """The file's bytes in chunks, each fed to `digest` and counted in `size[0]`."""
    while True:
        try:
            chunk = raw.read(_READ_SIZE)
        except OSError as err:
            raise DataError(f"data.paths: cannot read {path} ({err.strerror})", path) from None
        if not chunk:
            return
        digest.update(chunk)
        size[0] += len(chunk)
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
    is a DataError naming it (never silently shorter)."""
    new, errors, name = _decoder_factory(compression, path)
    decoder, fed = new(), False
    try:
        for chunk in chunks:
            data = chunk
            while data:
                fed = True
                out = decoder.decompress(data)
                if out:
                    yield out
                if decoder.eof:  # end of a member / frame: another may follow
                    data = decoder.unused_data
                    decoder, fed = new(), False
                else:
                    data = b""
    except errors as err:
        raise DataError(f"{path}: not a valid {name} file ({err}); check the file or drop its .{_ext(compression)} "
                        "suffix if it is not compressed", path) from None
    if fed:
        raise DataError(f"{path}: the {name} stream ends early (the file is truncated); download or "
                        "write it again", path)


def _ext(compression: str) -> str:
    return "gz" if compression == "gzip" else "zst"


# ---- parquet --------------------------------------------------------------------------------


def _read_parquet(path: Path, text_field: str) -> FileText:
    pq = require("pyarrow.parquet", path, "parquet files")
    pa = require("pyarrow", path, "parquet files")
    digest, size = hashlib.blake2b(digest_size=16), [0]
    records: list[tuple[str, str]] = []
    bad = 0
    with open_regular(path, "data.paths", _FIX) as f:
        for _ in _raw_chunks(f, digest, size, path):
            pass
        f.seek(0)
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
                    bad += n
                    if text.strip():
                        records.append((text, f"{path}:{row + i + 1}"))
                row += len(column)
        except (pa.ArrowException, OSError) as err:
            raise DataError(f"{path}: cannot read row group data near row {row + 1} ({err}); the file is "
                            "damaged", path) from None
    return FileText(records, bad, digest.digest(), size[0])
