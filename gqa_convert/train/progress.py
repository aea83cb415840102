"""The training progress bar: steps, tokens, loss and ETA, on the main process only."""

from __future__ import annotations

from typing import Any

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class TrainProgress:
    """Refreshed once per step, not by a background thread that would compete with training."""

    def __init__(self, accelerator: Any, total: int, done: int) -> None:
        self.bar = None
        if accelerator.is_main_process:
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
