"""The run directory's lifecycle: where a run's files go, one owner at a time, and nothing left
behind by a start that fails.

- `RunDirectory.create(config, run_dir)`: a new run. The target is checked before anything is
  made: a NUL character or a name too long for the filesystem, a file in the way, a virtual
  filesystem (/proc, /sys, /dev), a read-only or unwritable location are each one message naming
  the path and the cause. `run.dir/run.name` becomes `NAME-2`, `NAME-3`, ... rather than
  overwrite an earlier run; a folder is claimed with an atomic mkdir.
- `RunDirectory.reopen(path)`: a run to resume; its layout is checked first (`config.yaml` and
  `metrics.jsonl` files, `checkpoints/` a folder).
- Both take the run's lock, `fcntl.flock` on `RUN/.lock`, for the life of the run, and write the
  holder's pid into it; a second process is refused with a message naming that pid. The kernel
  drops the lock when its process dies, however it dies, so the lock file a killed run leaves
  behind never blocks its resume. Within one process a newer machine takes the lock over from an
  older one on the same folder, which can then no longer write checkpoints.
- `abandon()`: a start that fails removes what it created (the folders it made, or the files it
  added to a folder that existed before), never anything that was there before it.
- `write_file()`: files written whole or not at all (temporary file, fsync, rename), so a full
  disk never leaves an empty `config.yaml`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
from pathlib import Path
from typing import Any

from stackwise.training.errors import TrainingError

LOCK_FILE = ".lock"
_VIRTUAL = ("/proc", "/sys", "/dev")
_HELD: dict[str, RunLock] = {}  # folder (real path) -> the lock this process holds on it


def _why(err: OSError) -> str:
    return err.strerror or str(err)


class RunLock:
    """An exclusive lock on a run directory, held from `acquire()` to `release()`."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / LOCK_FILE
        self._file: Any = None
        self._pid = 0
        self.owned = False  # acquired (or unlockable here, and so taken as ours)
        self.superseded = False  # another machine of this process took the folder over

    @property
    def held(self) -> bool:
        return self._file is not None

    def acquire(self) -> None:
        key = os.path.realpath(self.folder)
        previous = _HELD.get(key)
        if previous is not None and previous.held and previous._pid == os.getpid():
            # The same process: an older machine on this folder (abandoned, or being resumed
            # from in a notebook or a test) hands the lock over and can no longer write.
            self._file, self._pid, previous._file, previous.superseded = previous._file, previous._pid, None, True
            self.owned = True
            _HELD[key] = self
            return
        for _ in range(50):  # the file changes only when a holder releases it at that moment
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
            except OSError as err:
                raise TrainingError(f"{self.path}: cannot create the run's lock file ({_why(err)})") from None
            handle = os.fdopen(fd, "r+b")
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(handle)
                handle.close()
                raise TrainingError(
                    f"{self.folder} is in use by another stackwise process (pid {holder}, lock file {self.path}): two "
                    "processes writing one run would destroy each other's checkpoints. Wait for it to finish, or stop "
                    f"it (kill {holder}; it writes a checkpoint and exits) and resume") from None
            except OSError:  # a filesystem without flock (some network mounts): unlocked, as before
                handle.close()
                self.owned = True
                return
            if _same_file(handle, self.path):
                break
            handle.close()  # released (and unlinked) by its holder between open and flock: again
        else:
            raise TrainingError(f"{self.path}: the lock file keeps changing; is another process starting this run?")
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n".encode())
        handle.flush()
        self._file, self._pid, self.owned = handle, os.getpid(), True
        _HELD[key] = self

    def release(self) -> None:
        self.owned = False
        if self._file is None:
            return
        with contextlib.suppress(OSError):
            if _same_file(self._file, self.path):
                os.unlink(self.path)  # before unlocking: a waiting process then retries on a new file
        self._file.close()
        self._file = None
        key = os.path.realpath(self.folder)
        if _HELD.get(key) is self:
            del _HELD[key]


def _holder(handle: Any) -> str:
    try:
        handle.seek(0)
        text = handle.read(32).decode("ascii", "replace").strip()
    except OSError:
        return "unknown"
    return text if text.isdigit() else "unknown"


def _same_file(handle: Any, path: Path) -> bool:
    try:
        mine, now = os.fstat(handle.fileno()), os.stat(path)
    except OSError:
        return False
    return (mine.st_dev, mine.st_ino) == (now.st_dev, now.st_ino)


class RunDirectory:
    """One run's folder, owned by this process while the run lives."""

    def __init__(self, path: Path, made: list[Path], before: set[str] | None):
        self.path = path
        self.lock = RunLock(path)
        self._made = made  # folders this start created, outermost first
        self._before = before  # the folder's entries before this start (None: this start made it)

    # ---- opening -----------------------------------------------------------------------------

    @classmethod
    def create(cls, run_config: Any, run_dir: str | os.PathLike[str] | None, field: str = "run_dir") -> RunDirectory:
        """A new run's folder: `run_dir` as given (named `field` in errors), else a fresh
        `run.dir/run.name[-N]`."""
        if run_dir is not None:
            path = Path(run_dir)
            check_target(path, field, field)
            if (path / "checkpoints").exists():
                raise TrainingError(f"{path} already holds a run; resume it with --resume {path} or choose another "
                                    "run directory")
            made = _make_folders(path)
        else:
            path = Path(run_config.dir) / run_config.name
            check_target(path, "run.dir", "run.name", claim=True)
            path, made = _claim(path)
        before = None if path in made else {entry.name for entry in path.iterdir()}
        return cls(path, made, before)._locked()

    @classmethod
    def reopen(cls, resume: str | os.PathLike[str]) -> RunDirectory:
        """The folder of a run to resume, checked and locked; nothing in it is changed here."""
        path = Path(resume)
        if "\x00" in str(path):
            raise TrainingError(f"--resume {str(path)!r}: a path cannot contain a NUL character")
        if not path.is_dir():
            raise TrainingError(f"{path}: no such run directory; nothing to resume")
        if not (path / "config.yaml").is_file() and not (path / "checkpoints").is_dir():
            raise TrainingError(f"{path}: not a run directory (no config.yaml, no checkpoints); nothing to resume")
        for name, kind in (("checkpoints", "folder"), ("config.yaml", "file"), ("metrics.jsonl", "file"),
                           ("tokenizer.json", "file")):
            entry = path / name
            if entry.exists() and (entry.is_dir() if kind == "file" else not entry.is_dir()):
                raise TrainingError(f"{entry}: is not a {kind} (a run keeps its {name} as a {kind}); move it away to "
                                    "resume")
        problem = _unwritable(path)
        if problem:
            raise TrainingError(f"{path}: cannot resume here: {problem}")
        return cls(path, [], {entry.name for entry in path.iterdir()})._locked()

    def _locked(self) -> RunDirectory:
        try:
            self.lock.acquire()
        except BaseException:
            # Someone else owns the folder: whatever appeared in it is theirs. Only the folders
            # this start made go, and only if still empty.
            _remove_folders(self._made)
            raise
        return self

    # ---- owning ----------------------------------------------------------------------------

    def check_owner(self) -> None:
        if self.lock.superseded:
            raise TrainingError(f"{self.path}: another TrainingMachine in this process has taken this run directory "
                                "over; this one can no longer write to it")

    def release(self) -> None:
        self.lock.release()

    def abandon(self) -> None:
        """A failed start: release the lock and remove what this start created."""
        if self.lock.superseded or not self.lock.owned:
            return  # the folder is another machine's (or process's): nothing here is ours to remove
        # Still holding the lock while removing, so no other process can have added anything.
        if self._before is None:
            shutil.rmtree(self.path, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                for entry in self.path.iterdir():
                    if entry.name not in self._before and entry.name != LOCK_FILE:
                        _remove(entry)
        self.release()
        _remove_folders([p for p in self._made if p != self.path])

    # ---- writing ---------------------------------------------------------------------------

    def write_file(self, name: str, content: str | bytes) -> Path:
        """Write `name` whole or not at all; a failure is one TrainingError naming the path."""
        self.check_owner()
        target = self.path / name
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}")
        data = content.encode("utf-8") if isinstance(content, str) else content
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, target)
        except OSError as err:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise TrainingError(f"{target}: writing failed ({_why(err)})") from None
        return target

    def keep_config(self, step: int) -> str | None:
        """Keep the current `config.yaml` as `config-<step>.yaml` (the record of how the steps
        before `step` ran); returns that file's name (None: there was no config.yaml)."""
        source = self.path / "config.yaml"
        if not source.is_file():
            return None
        data = source.read_bytes()
        name, n = f"config-{step:06d}.yaml", 2
        while (self.path / name).exists():
            if (self.path / name).read_bytes() == data:
                return name
            name, n = f"config-{step:06d}-{n}.yaml", n + 1
        self.write_file(name, data)
        return name


# ---- checks before anything is created ------------------------------------------------------


def check_target(path: Path, dir_field: str, name_field: str, claim: bool = False) -> None:
    """Refuse a run directory that cannot be made, before anything is created. `claim`: the
    folder's name may be taken (the run then gets the next free NAME-N)."""
    text = str(path)
    if "\x00" in text:
        field = name_field if "\x00" in path.name else dir_field
        raise TrainingError(f"{field}: {text!r} contains a NUL character, which no file name can hold")
    absolute = Path(os.path.abspath(path))
    ancestor = absolute
    while not os.path.lexists(ancestor) or (claim and ancestor == absolute and not ancestor.is_dir()):
        ancestor = ancestor.parent  # (a file named like the run is passed by: the run becomes NAME-2)
    if not ancestor.is_dir():
        field = name_field if ancestor == absolute else dir_field
        raise TrainingError(f"{field}: {ancestor} is {'a file' if ancestor.is_file() else 'not a folder'}; "
                            "the run directory must be a folder")
    name_max = _pathconf(ancestor, "PC_NAME_MAX", 255)
    for part in absolute.relative_to(ancestor).parts:
        size = len(os.fsencode(part))
        if size > name_max:
            field = name_field if part == absolute.name else dir_field
            raise TrainingError(f"{field}: the folder name {part[:40]!r}... is {size} bytes long; this filesystem "
                                f"({ancestor}) allows at most {name_max}")
    path_max = _pathconf(ancestor, "PC_PATH_MAX", 4096)
    if len(os.fsencode(str(absolute))) + 64 > path_max:  # room for the checkpoint files below it
        raise TrainingError(f"{dir_field}: {absolute} is too long a path ({len(str(absolute))} characters; at most "
                            f"{path_max - 64})")
    real = os.path.realpath(ancestor)
    if any(real == v or real.startswith(v + "/") for v in _VIRTUAL):
        raise TrainingError(f"{dir_field}: {path} is on a virtual filesystem ({real}), not on a disk; choose "
                            "another folder")
    problem = _unwritable(ancestor)
    if problem:
        raise TrainingError(f"{dir_field}: cannot create {path}: {problem}")


def _unwritable(folder: Path) -> str | None:
    try:
        read_only = bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:
        return f"{folder} is on a read-only filesystem"
    if not os.access(folder, os.W_OK | os.X_OK):
        return f"{folder} is not writable (permission denied)"
    return None


def _pathconf(path: Path, name: str, default: int) -> int:
    try:
        return os.pathconf(path, name)
    except (OSError, ValueError):
        return default


def _make_folders(path: Path) -> list[Path]:
    """mkdir -p that returns the folders it made, outermost first."""
    missing = []
    probe = path
    while not os.path.lexists(probe):
        missing.append(probe)
        probe = probe.parent
    made: list[Path] = []
    for folder in reversed(missing):
        try:
            folder.mkdir()
        except FileExistsError:
            continue
        except OSError as err:
            _remove_folders(made)
            raise TrainingError(f"{folder}: cannot create the run directory ({_why(err)})") from None
        made.append(folder)
    return made


def _claim(base: Path) -> tuple[Path, list[Path]]:
    """`base`, or the first of `base-2`, `base-3`, ... that is new or an empty folder."""
    made = _make_folders(base.parent)
    path, n = base, 2
    while True:
        try:
            path.mkdir()
            return path, [*made, path]
        except FileExistsError:
            if path.is_dir() and not any(path.iterdir()):
                return path, made
        except OSError as err:
            _remove_folders(made)
            raise TrainingError(f"{path}: cannot create the run directory ({_why(err)})") from None
        path, n = base.with_name(f"{base.name}-{n}"), n + 1


def _remove(entry: Path) -> None:
    if entry.is_dir() and not entry.is_symlink():
        shutil.rmtree(entry, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            entry.unlink()


def _remove_folders(made: list[Path]) -> None:
    """Remove folders a start created (innermost first), each only if it is still empty."""
    for folder in reversed(made):
        with contextlib.suppress(OSError):
            folder.rmdir()
