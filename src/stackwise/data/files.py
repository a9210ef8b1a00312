"""Opening input files without ever blocking: only regular files are read.

A FIFO given as a corpus blocks `open()` until some writer appears; `/dev/zero` or `/dev/urandom`
never end; a tape or terminal device may act on being opened. So every file the data plane reads
(corpus files, `tokenizer.json`, `tokenizer_config.json`, token cache metadata) is first
`os.stat`-ed (following symlinks) and refused unless it is a regular file, then opened with
O_NONBLOCK (a regular file ignores it; a FIFO swapped in after the stat cannot block) and checked
again with `fstat` on the open descriptor before a byte is read. `read_regular` reads the whole
file; `open_regular` hands the open file to a reader that streams it.
"""

from __future__ import annotations

import errno
import os
import stat
from pathlib import Path
from typing import BinaryIO

from stackwise.data.errors import DataError

_KINDS = (
    (stat.S_ISDIR, "a folder"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def file_kind(mode: int) -> str:
    """'a FIFO (named pipe)', 'a character device', ... for a stat mode that is not a regular file."""
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def not_regular(path: Path, mode: int, what: str, fix: str) -> DataError:
    return DataError(f"{what}: {path} is {file_kind(mode)}, not a regular file; {fix}", path)


def check_regular(path: str | os.PathLike[str], what: str, fix: str = "point it at a regular file") -> os.stat_result:
    """`os.stat(path)` if `path` is a regular file (symlinks followed), else a DataError naming it."""
    path = Path(path)
    try:
        st = os.stat(path)
    except OSError as err:
        raise DataError(f"{what}: cannot read {path} ({err.strerror})", path) from None
    if not stat.S_ISREG(st.st_mode):
        raise not_regular(path, st.st_mode, what, fix)
    return st


def open_regular(path: str | os.PathLike[str], what: str, fix: str = "point it at a regular file") -> BinaryIO:
    """The regular file `path` opened for binary reading (the caller closes it); a DataError naming
    it if it is anything else or cannot be opened. For files read as a stream (compressed corpora,
    parquet, token files) instead of all at once."""
    path = Path(path)
    check_regular(path, what, fix)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except OSError as err:
        hint = "check its permissions" if err.errno in (errno.EACCES, errno.EPERM) else fix
        raise DataError(f"{what}: cannot read {path} ({err.strerror}); {hint}", path) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # replaced between the stat and the open
            raise not_regular(path, st.st_mode, what, fix)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular(path: str | os.PathLike[str], what: str, fix: str = "point it at a regular file") -> bytes:
    """The bytes of the regular file `path`; a DataError naming it if it is anything else or unreadable."""
    path = Path(path)
    with open_regular(path, what, fix) as f:
        try:
            return f.read()
        except OSError as err:
            raise DataError(f"{what}: cannot read {path} ({err.strerror})", path) from None
