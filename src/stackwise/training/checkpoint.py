"""Checkpoints: atomic, checksummed, never executing code when loaded.

Layout (DESIGN.md section 8)::

    checkpoints/step_000123/model.safetensors   weights (tied tensors stored once)
                           /state.pt            optimizer, RNG, time and phase cursor
                           /meta.json           rack structure, step, t, phase, sha256 of both files

A checkpoint is written into a hidden temporary folder, every file is fsynced, and the folder is
renamed into place, so a crash leaves either the old set or the new one, never half of one.
Loading checks the checksums and structure; `latest_good()` walks back past damaged ones.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
MODEL_FILE, STATE_FILE, META_FILE = "model.safetensors", "state.pt", "meta.json"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, damaged or does not fit; the message names the path."""


@dataclass
class Checkpoint:
    path: Path
    step: int
    tensors: dict[str, torch.Tensor]
    state: dict[str, Any]
    meta: dict[str, Any]


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
        # The file writer is injectable so tests can simulate a failing disk.
        self._save_tensors = writer or save_file

    # ---- writing ------------------------------------------------------------------------

    def save(
        self, step: int, tensors: dict[str, torch.Tensor], state: dict[str, Any], meta: dict[str, Any]
    ) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        final = self.root / step_dir_name(step)
        tmp = self.root / f".tmp-{step_dir_name(step)}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            self._save_tensors(tensors, str(tmp / MODEL_FILE))
            torch.save(state, tmp / STATE_FILE)
            meta = {
                **meta,
                "format_version": FORMAT_VERSION,
                "step": step,
                "sha256": {MODEL_FILE: _sha256(tmp / MODEL_FILE), STATE_FILE: _sha256(tmp / STATE_FILE)},
            }
            meta["meta_sha256"] = _meta_digest(meta)
            (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
            for name in (MODEL_FILE, STATE_FILE, META_FILE):
                _fsync_file(tmp / name)
            _fsync_dir(tmp)
            self._replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        self.prune()
        return final

    def _replace(self, tmp: Path, final: Path) -> None:
        if final.exists():
            # Re-saving a step (after a resume): move the old one aside first so a crash between
            # the two renames still leaves one complete copy.
            old = final.with_name(f".old-{final.name}-{os.getpid()}")
            os.rename(final, old)
            os.rename(tmp, final)
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

    def latest_good(self, on_bad: Callable[[Path, str], None] | None = None) -> Checkpoint | None:
        """The newest checkpoint that passes every check; damaged ones are reported and skipped."""
        for path in reversed(self.list()):
            try:
                return load_checkpoint(path)
            except CheckpointError as err:
                if on_bad:
                    on_bad(path, str(err))
        return None


def read_meta(path: Path) -> dict[str, Any]:
    meta_path = Path(path) / META_FILE
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{meta_path}: missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{meta_path}: unreadable ({err})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("sha256"), dict) or "step" not in meta:
        raise CheckpointError(f"{meta_path}: not a stackwise checkpoint description")
    if meta.get("meta_sha256") != _meta_digest(meta):
        raise CheckpointError(f"{meta_path}: checksum mismatch (modified or damaged)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{meta_path}: format version {meta.get('format_version')!r}, this stackwise reads {FORMAT_VERSION}"
        )
    return meta


def load_checkpoint(path: str | os.PathLike[str]) -> Checkpoint:
    """Load and verify one checkpoint folder. Never unpickles arbitrary objects."""
    path = Path(path)
    meta = read_meta(path)
    for name in (MODEL_FILE, STATE_FILE):
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"{file}: missing")
        if _sha256(file) != meta["sha256"].get(name):
            raise CheckpointError(f"{file}: checksum mismatch (truncated or modified)")
    try:
        tensors = load_file(str(path / MODEL_FILE))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{path / MODEL_FILE}: unreadable ({err})") from None
    try:
        state = torch.load(path / STATE_FILE, map_location="cpu", weights_only=True)
    except Exception as err:  # weights_only refusals and damaged zips both land here
        raise CheckpointError(
            f"{path / STATE_FILE}: refused or unreadable ({type(err).__name__}: {err})"
        ) from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{path / STATE_FILE}: expected a dict of training state")
    return Checkpoint(path=path, step=int(meta["step"]), tensors=tensors, state=state, meta=meta)
