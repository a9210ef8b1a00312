"""The one error the data plane raises for bad input data."""

from __future__ import annotations

import os


class DataError(ValueError):
    """Bad or unusable training data.

    The message always names the file (or the config key) at fault and says how to fix it, because
    the person reading it is looking at a corpus on disk, not at our code. `path` keeps the file
    for programs that want it.
    """

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None):
        self.path = None if path is None else str(path)
        super().__init__(message)
