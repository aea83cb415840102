"""What a run reports: OUT/metrics.jsonl, one record per optimizer step, written in one place
(MetricsLog.write: the main process appends it, and the trackers receive it) and read back through the
one schema of gqa_convert.report.metrics; and the progress bar."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from gqa_convert.errors import GQAConvertError
from gqa_convert.report.metrics import METRICS_FILE, plain_record, read_records


def trim_metrics(path: Path, step: int) -> None:
    """On resume, keep the records up to the checkpoint's step (the steps after it are trained again);
    lines that are not records are dropped with the reader's warning."""
    if not path.exists():
        return
    if path.is_symlink() or not path.is_file():
        raise GQAConvertError(f"{path} is not a file this tool wrote: move it away and rerun with --resume")
    records = read_records(path)
    kept = "".join(json.dumps(record) + "\n" for record in records if record["step"] <= step)
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(kept)
    staged.replace(path)


class MetricsLog:
    """Where each step's record goes: OUT/metrics.jsonl (main process) and the trackers."""

    def __init__(self, out: Path, accelerator: Any, main: bool) -> None:
        self.path, self.accelerator, self.main = out / METRICS_FILE, accelerator, main

    def write(self, record: dict[str, Any]) -> None:
        record = plain_record(record)
        if self.main:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record) + "\n")
        if self.accelerator.trackers:
            values = {k: v for k, v in record.items() if k != "step" and v is not None}
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
