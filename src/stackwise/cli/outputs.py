"""Where a command writes its output: checked before any work, so a bad path costs nothing."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def output_folder_problem(path: Path) -> str | None:
    """Why nothing can be written at `path` (its folder is missing, is not a folder, or cannot be
    written: read-only file system, permissions), or None when it can."""
    parent = path.absolute().parent
    if not parent.exists():
        return f"the folder {parent} does not exist"
    if not parent.is_dir():
        return f"{parent} is not a folder"
    try:  # os.access says yes to root on a read-only file system: try for real, then clean up
        os.rmdir(tempfile.mkdtemp(prefix=".stackwise-probe-", dir=parent))
    except OSError as err:
        return f"cannot write in {parent}: {err.strerror or err}"
    return None
