"""Where metrics go: `metrics.jsonl` always, TensorBoard when installed, and the console.

On a terminal the console shows a tqdm bar; elsewhere (CI, pipes) it prints one plain line per
logged step, because tqdm writes carriage-return updates that become one garbled line in logs.
Both count steps done: the line of step index 149 of a 150-step run reads `step 150/150`, and the
bar ends at 150/150.

metrics.jsonl is handled as bytes when it is counted or cut back (a damaged line, even one that
is not UTF-8, is kept as it is rather than crash a resume) and read line by line, skipping lines
that are not JSON. A failed write (a full disk) is one TrainingError naming the file.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from stackwise.training.errors import TrainingError


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN/Inf; keep them readable
    return value


class MetricsLogger:
    """One JSON object per logged step (`"kind": "step"`) and per event (`transition`, `eval`, ...)."""

    def __init__(
        self, run_dir: str | Path | None, total_steps: int, console: bool = True, stream: TextIO | None = None,
        start_step: int = 0,
    ):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.total_steps = total_steps
        self.stream = stream or sys.stderr
        self.console = console
        self._file = None
        self._tb = None
        self._tb_missing = False  # tensorboard is not installed: said once in the loggers line
        self._bar = None
        self.lines = 0  # records in metrics.jsonl; a checkpoint stores it so resume can truncate
        if self.run_dir is not None:
            path = self.run_dir / "metrics.jsonl"
            try:
                self.lines = len(_lines(path.read_bytes())) if path.exists() else 0
                self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 - closed in close()
            except OSError as err:
                raise TrainingError(f"{path}: cannot open the run's metrics ({err.strerror or err})") from None
            self._tb = _tensorboard_writer(self.run_dir / "tb")
            self._tb_missing = self._tb is None
        if console and _is_terminal(self.stream):
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, file=self.stream, dynamic_ncols=True, leave=True)

    @staticmethod
    def truncate(run_dir: str | Path, keep_lines: int) -> int:
        """Keep the first `keep_lines` records: a resumed run redoes whatever was logged after its
        checkpoint, so no step appears twice. Returns how many records were dropped."""
        path = Path(run_dir) / "metrics.jsonl"
        if not path.exists():
            return 0
        try:
            lines = _lines(path.read_bytes())
            kept = [line for line in lines[:keep_lines] if line.endswith(b"\n")]  # a torn last line goes too
            if len(kept) == len(lines):
                return 0  # nothing to cut: the file is left as it is
            tmp = path.with_suffix(".jsonl.tmp")
            with open(tmp, "wb") as f:
                f.write(b"".join(kept))
                f.flush()
                os.fsync(f.fileno())
            tmp.replace(path)
        except OSError as err:
            raise TrainingError(f"{path}: cutting it back to the checkpoint's records failed ({err.strerror or err})") \
                from None
        return len(lines) - len(kept)

    def record(self, kind: str, **fields: Any) -> None:
        entry = {"kind": kind, "time": round(time.time(), 3), **{k: _jsonable(v) for k, v in fields.items()}}
        if self._file is not None:
            try:
                self._file.write(json.dumps(entry) + "\n")
                self._file.flush()
            except OSError as err:
                raise TrainingError(f"{self.run_dir / 'metrics.jsonl'}: writing failed ({err.strerror or err})") \
                    from None
            self.lines += 1
        if self._tb is not None and "step" in fields:
            for key, value in fields.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, fields["step"])

    def step(self, **fields: Any) -> None:
        self.record("step", **fields)
        done = fields["step"] + 1  # steps done, counting this one
        if self._bar is not None:
            self._bar.n = done
            self._bar.set_postfix_str(
                f"{fields.get('phase', '')} loss {fields.get('loss', float('nan')):.4f}"
                + (f" MFU {fields['mfu']:.1%}" if "mfu" in fields else "")
            )
        elif self.console:
            mfu = f"  MFU {fields['mfu']:.1%}" if "mfu" in fields else ""  # CUDA, a GPU of the peak table
            self.say(
                f"step {done:>6}/{self.total_steps}  t={fields['t']:.3f}  {fields.get('phase', '')}  "
                f"loss {fields['loss']:.4f}  lr {fields['lr']:.2e}  {fields.get('tokens_per_s', 0):,.0f} tok/s{mfu}"
            )

    def describe(self, extra: list[str] | None = None) -> str:
        """The one line that says where metrics go, e.g. `loggers: metrics.jsonl (runs/x/metrics.jsonl),
        wandb offline (runs/x/wandb); tensorboard: not installed (pip install tensorboard)`."""
        active = []
        if self.run_dir is not None:
            active.append(f"metrics.jsonl ({self.run_dir / 'metrics.jsonl'})")
        if self._tb is not None:
            active.append(f"tensorboard ({self.run_dir / 'tb'})")
        active += extra or []
        line = "loggers: " + (", ".join(active) if active else "console only (no run directory)")
        if self._tb_missing:
            line += "; tensorboard: not installed (pip install tensorboard)"
        return line

    def say(self, message: str) -> None:
        if not self.console:
            return
        if self._bar is not None:
            self._bar.write(message, file=self.stream)
        else:
            print(message, file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._file is not None:
            with contextlib.suppress(OSError):  # a write that failed was already reported
                self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _tensorboard_writer(path: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:  # tensorboard is an optional extra
        return None
    return SummaryWriter(str(path))


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All records of a run's metrics.jsonl (torn or damaged lines skipped)."""
    records = []
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return records
    for line in _lines(path.read_bytes()):
        try:
            record = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


def _lines(data: bytes) -> list[bytes]:
    """The lines of metrics.jsonl, each with its newline (the last one may lack it: torn)."""
    lines = data.split(b"\n")
    out = [line + b"\n" for line in lines[:-1]]
    return [*out, lines[-1]] if lines[-1] else out
