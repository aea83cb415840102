"""Training checkpoints (full state through Accelerate, collective on every rank) and the metrics
log they are kept consistent with."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

COMPLETE = "COMPLETE"  # written last: a checkpoint without it was cut short and is ignored
TRAINER_STATE = "trainer_state.json"


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(accelerator: Any, out: Path, step: int, trainer_state: dict[str, int]) -> None:
    """Every rank must call this: save_state gathers sharded (FSDP/DeepSpeed) state."""
    folder = checkpoint_dir(out, step)
    if accelerator.is_main_process and folder.exists():  # left by a run killed mid-save
        shutil.rmtree(folder)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(folder))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (folder / TRAINER_STATE).write_text(json.dumps(trainer_state))
        (folder / COMPLETE).write_text("")
    accelerator.wait_for_everyone()


def load_checkpoint(accelerator: Any, folder: Path) -> dict[str, int]:
    """Restore model, optimizer and RNG (every rank) and return the trainer's own state."""
    accelerator.load_state(str(folder))
    return json.loads((folder / TRAINER_STATE).read_text())


def complete_checkpoints(out: Path) -> list[Path]:
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("step-") and (p / COMPLETE).exists())


def latest_checkpoint(out: Path) -> Path | None:
    found = complete_checkpoints(out)
    return found[-1] if found else None


def prune_checkpoints(out: Path, keep: int) -> None:
    for folder in complete_checkpoints(out)[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)


def read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line]


def trim_metrics(path: Path, step: int) -> None:
    """On resume, drop the lines of steps after the checkpoint: they are trained again."""
    if not path.exists():
        return
    kept = [record for record in read_metrics(path) if record["step"] <= step]
    path.write_text("".join(json.dumps(record) + "\n" for record in kept))


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
