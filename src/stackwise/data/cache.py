"""Where the data caches live, and the atomic writes that keep them consistent.

Two processes (two runs, or the ranks of one torchrun) may build the same cache entry at the same
time; each writes into its own temporary name and renames it into place, so a reader sees either
nothing or a complete entry, never a half-written one.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

ENV_VAR = "STACKWISE_CACHE"


def resolve_cache_dir(configured: str | os.PathLike[str] | None = None) -> Path:
    """`data.cache_dir`, else $STACKWISE_CACHE, else ~/.cache/stackwise."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return Path.home() / ".cache" / "stackwise"


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` through a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def new_temp_dir(final: Path) -> Path:
    """A private folder next to `final`, to be filled and then published with `publish_dir`."""
    final.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))


def publish_dir(tmp: Path, final: Path) -> None:
    """Rename a filled temporary folder to `final`; if another process got there first, keep theirs."""
    try:
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        shutil.rmtree(tmp, ignore_errors=True)
