"""What a run reports: OUT/metrics.jsonl, one record per optimizer step, written in one place
(MetricsLog.write: the main process appends it, and the trackers receive it), read back with its
schema checked (a line cut short by a crash, or altered, is left out with a warning: never a
traceback); and the progress bar."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from gqa_convert.errors import GQAConvertError

METRICS = "metrics.jsonl"
MAX_LINE = 1 << 16  # no record is longer; a longer line is not one of ours
_COUNTS = ("step", "tokens", "eval_tokens")  # whole numbers (step 0: the start, evaluated before training)
_NUMBERS = ("loss", "lr", "tokens_per_s", "grad_norm", "distill_loss", "eval_perplexity", "source_perplexity")


def valid_record(record: Any) -> bool:
    """A record this tool writes: a step and token count, and numbers (or null) where numbers go."""
    if not isinstance(record, dict) or "step" not in record or "tokens" not in record:
        return False
    for key in _COUNTS:
        value = record.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return False
    return all(
        record.get(key) is None or (isinstance(record[key], int | float) and not isinstance(record[key], bool))
        for key in _NUMBERS
    )


def _lines(path: Path) -> Iterator[bytes | None]:
    """The file's lines, None for a line too long to be a record (read in bounded pieces)."""
    with open(path, "rb") as handle:
        while line := handle.readline(MAX_LINE + 1):
            if len(line) > MAX_LINE and not line.endswith(b"\n"):
                while (rest := handle.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                    pass
                yield None
            else:
                yield line


def _records(path: Path) -> tuple[list[dict[str, Any]], int]:
    """(the valid records, the count of other non-blank lines)."""
    records, dropped = [], 0
    if not path.is_file():
        return records, dropped
    for line in _lines(path):
        if line is not None and not line.strip():
            continue
        try:
            record = json.loads(line) if line is not None else None
        except (ValueError, RecursionError):
            record = None
        if valid_record(record):
            records.append(record)
        else:
            dropped += 1
    return records, dropped


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The valid records of a metrics log, in order."""
    return _records(path)[0]


def trim_metrics(path: Path, step: int) -> None:
    """On resume, keep the records up to the checkpoint's step (the steps after it are trained again);
    lines that are not records are dropped with a warning."""
    if not path.exists():
        return
    if path.is_symlink() or not path.is_file():
        raise GQAConvertError(f"{path} is not a file this tool wrote: move it away and rerun with --resume")
    records, dropped = _records(path)
    if dropped:
        warnings.warn(f"{path.name}: dropped {dropped} unreadable line(s) left by a crash", stacklevel=2)
    kept = "".join(json.dumps(record) + "\n" for record in records if record["step"] <= step)
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(kept)
    staged.replace(path)


class MetricsLog:
    """Where each step's record goes: OUT/metrics.jsonl (main process) and the trackers."""

    def __init__(self, out: Path, accelerator: Any, main: bool) -> None:
        self.path, self.accelerator, self.main = out / METRICS, accelerator, main

    def write(self, record: dict[str, Any]) -> None:
        if self.main:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.accelerator.trackers:
            values = {k: v for k, v in record.items() if k != "step" and v is not None and math.isfinite(v)}
            self.accelerator.log(values, step=record["step"])


class TrainProgress:
    """Steps, tokens, loss and ETA on the main process; refreshed once per step, not by a background
    thread that would compete with training."""

    def __init__(self, main: bool, total: int, done: int) -> None:
        self.bar = None
        if main:
            columns = (TextColumn("uptrain"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"))
            self.bar = Progress(*columns, TimeRemainingColumn(), auto_refresh=False)
            self.bar.start()
            self.task = self.bar.add_task("uptrain", total=total, completed=done, info="")

    def update(self, step: int, tokens: int, loss: float) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=step, info=f"{tokens:,} tok  loss {loss:.4f}")
            self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
