"""Progress of a long data-preparation stage: MB done, MB/s and the time left.

On a terminal one line is rewritten in place twice a second; otherwise (a log file, CI) a plain
line is printed every 10 seconds. Nothing is printed for a stage that ends within its first
interval, so small corpora stay quiet; a stage that printed anything ends with a summary line.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

TTY_INTERVAL = 0.5  # seconds between redraws on a terminal
PLAIN_INTERVAL = 10.0  # seconds between lines otherwise


class Progress:
    """Counts the bytes a stage has handled and reports the rate now and then."""

    def __init__(self, label: str, total_bytes: int | None = None, stream: TextIO | None = None,
                 interval: float | None = None, enabled: bool = True):
        """`enabled=False`: counts, never prints (a caller that was asked for no progress)."""
        self.label = label
        self.enabled = enabled
        self.total = total_bytes or None
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = interval if interval is not None else (TTY_INTERVAL if self.tty else PLAIN_INTERVAL)
        self.done = 0
        self.shown = False
        self.start = self.last = time.monotonic()

    def advance(self, n_bytes: int) -> None:
        self.done += n_bytes
        now = time.monotonic()
        if self.enabled and now - self.last >= self.interval:
            self.last = now
            self._write(self.line(now))

    def line(self, now: float | None = None) -> str:
        elapsed = max((now or time.monotonic()) - self.start, 1e-9)
        rate = self.done / elapsed
        text = f"{self.label}: {self.done / 1e6:,.1f}"
        if self.total:
            text += f" of {self.total / 1e6:,.1f} MB ({min(100.0, 100 * self.done / self.total):.0f}%)"
        else:
            text += " MB"
        text += f", {rate / 1e6:,.1f} MB/s"
        if self.total and rate > 0:
            text += f", ETA {_clock(max(0.0, (self.total - self.done) / rate))}"
        return text

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.finish()

    def finish(self) -> None:
        """The summary line, when the stage printed anything."""
        if self.shown:
            elapsed = time.monotonic() - self.start
            summary = f"{self.label}: {self.done / 1e6:,.1f} MB in {_clock(elapsed)} ({self.done / 1e6 / max(elapsed, 1e-9):,.1f} MB/s)"
            self._write(summary, final=True)

    def _write(self, text: str, final: bool = False) -> None:
        self.shown = True
        if self.tty:
            self.stream.write("\r\x1b[2K" + text + ("\n" if final else ""))
        else:
            self.stream.write(text + "\n")
        self.stream.flush()


def _clock(seconds: float) -> str:
    hours, rest = divmod(round(seconds), 3600)
    return f"{hours}:{rest // 60:02d}:{rest % 60:02d}" if hours else f"{rest // 60}:{rest % 60:02d}"
