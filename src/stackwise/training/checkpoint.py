"""Checkpoints: atomic, checksummed, never executing code when loaded.

Layout (DESIGN.md section 8)::

    checkpoints/step_000123/model.safetensors   weights (a tied tensor stored once, see `model_tensors`)
                           /state.pt            optimizer, RNG, time and phase cursor
                           /meta.json           rack structure, step, t, phase, sha256 of every file
                           /meta.json.sha256    sha256 of meta.json's bytes, checked before it is parsed

A distributed run (torchrun) writes `dcp/` instead of `model.safetensors`: a
`torch.distributed.checkpoint` folder holding the model weights and the optimizer's per-parameter
state, each rank writing its own shards; `state.pt` then holds the rest of the training state.
Either kind resumes with any number of ranks; `stackwise consolidate` turns the second into the first.

A checkpoint is written into a hidden temporary folder, every file is fsynced, and the folder is
renamed into place, so a crash leaves either the old set or the new one, never half of one. Any
failure while writing (a full disk surfaces as OSError, as RuntimeError from torch.save or as
SafetensorError) is one `CheckpointWriteError` naming the checkpoint and the cause.

Loading checks, in order: meta.json's size and the checksum of its bytes (before it is parsed; a
checkpoint written before that file existed is checked by the digest meta.json carries of
itself), its nesting and schema, the checksum of every file, the schema of the training state
(`checkpoint_schema.py`), and that weights and optimizer state are finite. The checksums are not
keyed, so they catch damage, not forgery; the schema and finiteness checks are what stand between
a forged checkpoint and the run. `latest_good()` walks back past checkpoints that fail.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pickle
import shutil
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from stackwise.model import quant
from stackwise.model.lora import flatten_state
from stackwise.training.checkpoint_schema import SchemaError, check_meta, check_state, optimizer_tensors
from stackwise.training.finite import nonfinite_tensors

FORMAT_VERSION = 1
MODEL_FILE, STATE_FILE, META_FILE = "model.safetensors", "state.pt", "meta.json"
META_SUM_FILE = "meta.json.sha256"
MAX_META_BYTES = 64 << 20  # a description is kilobytes; anything this large is damage, not a checkpoint
DCP_DIR = "dcp"
DCP_METADATA = f"{DCP_DIR}/.metadata"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or does not fit; the message names the path."""


class CheckpointWriteError(CheckpointError):
    """Writing a checkpoint failed (disk full, permissions, ...); nothing of it was left behind."""


def _cause(err: BaseException) -> str:
    if isinstance(err, OSError):
        return str(err)
    lines = [line for line in str(err).splitlines() if line.strip()]
    return f"{type(err).__name__}: {lines[0].strip() if lines else ''}"


def model_tensors(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's weights as model.safetensors stores them, and the tied ones: a tensor that is
    another's (the head's weight shared with the embedding) is stored once, under its first name;
    `tied` maps each other name to that one, and loading puts the tie back."""
    state = model.state_dict()
    first: dict[tuple[Any, ...], str] = {}
    tied: dict[str, str] = {}
    for name, t in state.items():
        if quant.is_nf4(t) or t.numel() == 0 or t.device.type == "meta":
            continue
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)
        if key in first:
            tied[name] = first[key]
        else:
            first[key] = name
    return flatten_state({k: v for k, v in state.items() if k not in tied}), tied


@dataclass
class Checkpoint:
    path: Path
    step: int
    tensors: dict[str, torch.Tensor] | None  # None for a sharded (DCP) checkpoint: see `load_dcp`
    state: dict[str, Any]
    meta: dict[str, Any]

    @property
    def sharded(self) -> bool:
        return self.tensors is None


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _meta_digest(meta: dict[str, Any]) -> str:
    """sha256 of the description itself (all fields but this one), so a flipped bit in
    meta.json is caught like one in the files it describes."""
    body = {k: v for k, v in meta.items() if k != "meta_sha256"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class CheckpointManager:
    """Writes, lists, verifies and prunes the checkpoints of one run directory."""

    def __init__(
        self, run_dir: str | os.PathLike[str], keep_last: int = 3, writer: Callable[..., None] | None = None
    ):
        self.root = Path(run_dir) / "checkpoints"
        self.keep_last = keep_last
        # The file writer is injectable so tests can simulate a failing disk (None: safetensors').
        self._save_tensors = writer

    # ---- writing ------------------------------------------------------------------------

    def save(
        self, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any], meta: dict[str, Any]
    ) -> Path:
        """One process's checkpoint: weights in model.safetensors."""
        tmp = self.begin(step)
        with self._writing(tmp, step, MODEL_FILE):
            (self._save_tensors or safetensors.torch.save_file)(tensors, str(tmp / MODEL_FILE))
        return self.finish(tmp, step, state, meta)

    @contextlib.contextmanager
    def _writing(self, tmp: Path, step: int, what: str) -> Iterator[None]:
        """Any failure inside becomes one CheckpointWriteError; the temporary folder goes."""
        try:
            yield
        except CheckpointWriteError:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        except Exception as err:  # OSError, torch.save's RuntimeError, SafetensorError, ...
            shutil.rmtree(tmp, ignore_errors=True)
            raise CheckpointWriteError(f"{self.root / step_dir_name(step)}: writing {what} failed ({_cause(err)})") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def begin(self, step: int) -> Path:
        """A fresh hidden folder to write the checkpoint of `step` into."""
        tmp = self.root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        except OSError as err:
            raise CheckpointWriteError(f"{tmp}: cannot create the checkpoint folder ({_cause(err)})") from None
        return tmp

    def finish(self, tmp: Path, step: int, state: dict[str, Any], meta: dict[str, Any]) -> Path:
        """Add state.pt and meta.json (checksums of every file written) to `tmp`, make it durable,
        and rename it into place."""
        final = self.root / step_dir_name(step)
        with self._writing(tmp, step, STATE_FILE):
            torch.save(state, tmp / STATE_FILE)
        with self._writing(tmp, step, META_FILE):
            files = sorted(p.relative_to(tmp).as_posix() for p in tmp.rglob("*") if p.is_file())
            meta = {**meta, "format_version": FORMAT_VERSION, "step": step,
                    "sha256": {name: _sha256(tmp / name) for name in files}}
            meta["meta_sha256"] = _meta_digest(meta)
            text = json.dumps(meta, indent=2, sort_keys=True).encode()
            (tmp / META_FILE).write_bytes(text)
            (tmp / META_SUM_FILE).write_text(hashlib.sha256(text).hexdigest() + "\n")
            for name in [*files, META_FILE, META_SUM_FILE]:
                _fsync_file(tmp / name)
            for folder in {(tmp / name).parent for name in files} | {tmp}:
                _fsync_dir(folder)
            self._replace(tmp, final)
        self.prune()
        return final

    def _replace(self, tmp: Path, final: Path) -> None:
        if final.exists():
            # Re-saving a step (after a resume): move the old one aside first so a crash between
            # the two renames still leaves one complete copy.
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.rename(final, old)
            try:
                os.rename(tmp, final)
            except OSError:
                os.rename(old, final)  # the old one back in place: the failure leaves what was there
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(self.root)

    def recover(self) -> list[str]:
        """Tidy after a crash: drop half-written temporary folders, and put back a checkpoint that
        was moved aside for a re-save when the crash came before its replacement landed.
        Returns what was done, for the log."""
        done: list[str] = []
        if not self.root.is_dir():
            return done
        for path in sorted(self.root.iterdir()):
            if path.name.startswith(".old-"):
                final = self.root / path.name[len(".old-"):].rsplit("-", 1)[0]
                if final.exists():
                    shutil.rmtree(path, ignore_errors=True)
                    done.append(f"removed {path.name}")
                else:
                    os.rename(path, final)
                    done.append(f"restored {final.name}")
            elif path.name.startswith(".tmp-"):
                shutil.rmtree(path, ignore_errors=True)
                done.append(f"removed unfinished {path.name}")
        return done

    def prune(self) -> None:
        for path in self.list()[: -self.keep_last]:
            shutil.rmtree(path, ignore_errors=True)

    # ---- reading ------------------------------------------------------------------------

    def list(self) -> list[Path]:
        """Complete checkpoint folders, oldest first (temporary folders are ignored)."""
        if not self.root.is_dir():
            return []
        return sorted(p for p in self.root.iterdir() if p.is_dir() and p.name.startswith("step_"))

    def latest_good(self, on_bad: Callable[[Path, str], None] | None = None,
                    check: Callable[[Checkpoint], None] | None = None) -> Checkpoint | None:
        """The newest checkpoint that passes every check (and `check`, which raises
        CheckpointError for one that does not fit); failing ones are reported and skipped."""
        return next(self.good(on_bad, check), None)

    def good(self, on_bad: Callable[[Path, str], None] | None = None,
             check: Callable[[Checkpoint], None] | None = None) -> Iterator[Checkpoint]:
        """The checkpoints that pass every check, newest first, loaded one at a time."""
        for path in reversed(self.list()):
            try:
                ckpt = load_checkpoint(path)
                if check is not None:
                    check(ckpt)
            except CheckpointError as err:
                if on_bad:
                    on_bad(path, str(err))
                continue
            yield ckpt


def read_meta(path: Path) -> dict[str, Any]:
    """meta.json, its bytes checked before they are parsed, then its schema."""
    meta_path = Path(path) / META_FILE
    try:
        size = meta_path.stat().st_size
        if size > MAX_META_BYTES:
            raise CheckpointError(f"{meta_path}: {size} bytes, far more than a checkpoint description (damaged)")
        raw = meta_path.read_bytes()
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path}: missing") from None
    except OSError as err:
        raise CheckpointError(f"{meta_path}: unreadable ({err})") from None
    _check_meta_bytes(Path(path), raw)
    try:
        meta = json.loads(raw.decode("utf-8"))
    except RecursionError:
        raise CheckpointError(f"{meta_path}: nested too deeply to be a checkpoint description (damaged)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_path}: unreadable ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), dict) or "step" not in meta:
        raise CheckpointError(f"{meta_path}: not a stackwise checkpoint description")
    try:
        intact = meta.get("meta_sha256") == _meta_digest(meta)
    except (RecursionError, TypeError, ValueError):
        intact = False
    if not intact:
        raise CheckpointError(f"{meta_path}: checksum mismatch (modified or damaged)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: format version {meta.get('format_version')!r}, this stackwise reads {FORMAT_VERSION}"
        )
    try:
        check_meta(meta)
    except SchemaError as err:
        raise CheckpointError(f"{meta_path}: {err}") from None
    return meta


def _check_meta_bytes(folder: Path, raw: bytes) -> None:
    """Against meta.json.sha256, when there is one (checkpoints written before it existed carry
    only the digest meta.json holds of itself, checked once it is parsed)."""
    sums = folder / META_SUM_FILE
    if not sums.exists():
        return
    try:
        expected = sums.read_bytes()[:200].decode("ascii").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{sums}: unreadable ({err})") from None
    if hashlib.sha256(raw).hexdigest() != expected:
        raise CheckpointError(f"{folder / META_FILE}: checksum mismatch (modified or damaged)")


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load and verify one checkpoint folder. Never unpickles arbitrary objects."""
    path = Path(path)
    meta = read_meta(path)
    listed = meta["sha256"]
    if MODEL_FILE not in listed and DCP_METADATA not in listed:
        raise CheckpointError(f"{path}: holds no weights (neither {MODEL_FILE} nor {DCP_DIR}/)")
    for name in sorted({STATE_FILE, *listed}):
        file = path / name
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise CheckpointError(f"{path / META_FILE}: lists a file outside the checkpoint ({name})")
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if _sha256(file) != listed.get(name):
            raise CheckpointError(f"{file}: checksum mismatch (truncated or modified)")
    tensors = None
    if MODEL_FILE in listed:
        try:
            tensors = load_file(str(path / MODEL_FILE))
        except (SafetensorError, OSError, ValueError) as err:
            raise CheckpointError(f"{path / MODEL_FILE}: unreadable ({err})") from None
        _tie(path, tensors, meta.get("tied", {}))
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refusals, damaged zips, too deep a nesting all land here
        raise CheckpointError(
            f"{path / STATE_FILE}: refused or unreadable ({type(err).__name__}: {(str(err).splitlines() or [''])[0]})"
        ) from None
    try:
        check_state(state, meta, sharded=tensors is None)
    except SchemaError as err:
        raise CheckpointError(f"{path / STATE_FILE}: {err}") from None
    # A checkpoint that holds NaN/Inf is damaged: a run resumed from it could only go on failing.
    bad = nonfinite_tensors([*(tensors or {}).items(), *optimizer_tensors(state)])
    if bad:
        more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
        raise CheckpointError(f"{path}: holds non-finite values (NaN/Inf) in {', '.join(bad[:5])}{more}")
    return Checkpoint(path=path, step=int(meta["step"]), tensors=tensors, state=state, meta=meta)


def _tie(path: Path, tensors: dict[str, torch.Tensor], tied: dict[str, str]) -> None:
    """Put back the tensors stored once for several names (see `model_tensors`)."""
    for alias, source in tied.items():
        if alias in tensors or source not in tensors:
            raise CheckpointError(f"{path / META_FILE}: tied: {alias!r} -> {source!r} does not fit {MODEL_FILE}")
        tensors[alias] = tensors[source]


# ---- sharded checkpoints (torch.distributed.checkpoint) -----------------------------------


def save_dcp(folder: Path, tensors: dict[str, Any]) -> None:
    """Every rank writes its shards of `tensors` (nested dicts of tensors) into `folder`; a
    collective when distributed, a plain write in one process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _quiet_single_process():
            dcp.save(tensors, storage_writer=dcp.FileSystemWriter(str(folder)), no_dist=not _distributed())
    except (OSError, CheckpointException) as err:
        raise CheckpointError(f"{folder}: writing the sharded checkpoint failed ({_first_line(err)})") from None


def load_dcp(folder: Path, into: dict[str, Any]) -> None:
    """Fill `into` (tensors laid out as this run wants them: whole, or this rank's shards) from a
    DCP folder written with any number of ranks."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    try:
        with _quiet_single_process():
            dcp.load(into, storage_reader=_safe_reader(str(folder)), no_dist=not _distributed())
    except CheckpointError:
        raise
    except (Exception, CheckpointException) as err:  # DCP gathers every rank's failure into one (a BaseException)
        raise CheckpointError(f"{folder}: unreadable sharded checkpoint ({_first_line(err)})") from None


def _first_line(err: BaseException) -> str:
    """DCP's errors carry each rank's traceback; the reason is in the last line of the first."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    reason = next((line for line in lines if "refused" in line or "Error:" in line), lines[-1] if lines else "")
    return f"{type(err).__name__}: {reason.strip()}"


@contextlib.contextmanager
def _quiet_single_process() -> Iterator[None]:
    """DCP warns that it "assumes" one process when no process group exists: that is intended."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def _distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


# DCP describes its shards in a pickle (.metadata). It is read with an unpickler that builds only
# DCP's own description classes and a few torch values, never an arbitrary callable.
_METADATA_GLOBALS = {
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "PurePosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PureWindowsPath"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        is_dtype = module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        if module.startswith("torch.distributed.checkpoint.") or is_dtype or (module, name) in _METADATA_GLOBALS:
            found = super().find_class(module, name)
            if module.startswith("torch.distributed.checkpoint.") and not isinstance(found, type):
                raise CheckpointError(f"sharded checkpoint metadata refers to {module}.{name}, which is not a class")
            return found
        raise CheckpointError(f"sharded checkpoint metadata refers to {module}.{name}: refused")


def _reader_class() -> type:
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            with open(Path(str(self.path)) / ".metadata", "rb") as f:
                try:
                    metadata = _MetadataUnpickler(f).load()
                except CheckpointError as err:
                    raise CheckpointError(f"{Path(str(self.path)) / '.metadata'}: {err}") from None
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    return SafeReader


def _safe_reader(folder: str) -> Any:
    return _reader_class()(folder)
