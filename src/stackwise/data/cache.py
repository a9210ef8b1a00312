"""Where the data caches live, and the atomic writes that keep them consistent.

Two processes (two runs, or the ranks of one torchrun) may build the same cache entry at the same
time; each writes into its own temporary name and renames it into place, so a reader sees either
nothing or a complete entry, never a half-written one.

A cache folder that cannot be used (a file where the folder should be, no write permission, a
read-only file system, a full disk) is one `DataError` naming the folder and the cause. A cache
that is only read (every entry a run needs is already there) may be read-only.
"""

from __future__ import annotations

import errno
import os
import shutil
import tempfile
from pathlib import Path

from stackwise.data.errors import DataError

ENV_VAR = "STACKWISE_CACHE"
WHERE = "data.cache_dir (or $STACKWISE_CACHE)"


def resolve_cache_dir(configured: str | os.PathLike[str] | None = None) -> Path:
    """`data.cache_dir`, else $STACKWISE_CACHE, else ~/.cache/stackwise."""
    if configured:
        return Path(configured).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return Path.home() / ".cache" / "stackwise"


def _blocking_file(path: Path) -> Path | None:
    """The first existing component of `path` (itself or an ancestor) that is not a folder."""
    for part in (path, *path.parents):
        if part.exists() or part.is_symlink():
            return None if part.is_dir() else part
    return None


def check_cache_dir(path: Path) -> None:
    """Refuse at once a cache location that can never be a folder (it, or a folder above it, is a file)."""
    blocker = _blocking_file(path)
    if blocker is not None:
        where = "is a file" if blocker == path else f"cannot be created: {blocker} is a file"
        raise DataError(f"{WHERE}: the cache folder {path} {where}, not a folder; "
                        "point data.cache_dir at a folder (it is created if missing)", path)


def could_write(path: Path) -> bool:
    """Whether the cache folder `path` exists writable, or could be created (its nearest
    existing ancestor is a writable folder); nothing is created."""
    for part in (path, *path.parents):
        if part.exists():
            return part.is_dir() and os.access(part, os.W_OK | os.X_OK)
    return False


def cache_error(path: Path, err: OSError, doing: str) -> DataError:
    """One message for a cache write that failed: the folder, what was being done and why."""
    if err.errno in (errno.ENOTDIR, errno.EEXIST) and _blocking_file(path) is not None:
        return DataError(f"{WHERE}: {path} cannot be a folder: {_blocking_file(path)} is a file; "
                         "point data.cache_dir at a folder", path)
    if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        fix = "make it writable or point data.cache_dir at a writable folder"
    elif err.errno in (errno.ENOSPC, errno.EDQUOT):
        fix = "free space on that disk or point data.cache_dir at a folder on another disk"
    else:
        fix = "point data.cache_dir at a writable folder"
    return DataError(f"{WHERE}: {doing} in {path} failed ({err.strerror or err}); {fix}", path)


def ensure_writable(path: Path, doing: str) -> None:
    """Create the cache folder `path` if needed and prove it writable with a probe file, so a
    read-only cache is reported before expensive work (tokenizing, training a BPE) is done."""
    check_cache_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".probe-", suffix=".tmp", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise cache_error(path, err, doing) from None


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
