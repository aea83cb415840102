"""Training checkpoints, the choice of the one to resume from, and the metrics log kept consistent with them.

OUT/checkpoints/step-NNNNNNNN holds the strategy's state (ddp and fsdp2: torch.distributed.checkpoint,
one .distcp file per rank and a .metadata; deepspeed: its own partitioned files), each rank's RNG state,
trainer_state.json (step, tokens, and the settings that fix the data order and the budget) and, written
last, COMPLETE: the size and a checksum (CRC32 of the first and last MiB) of every other file. A folder
without COMPLETE was cut short and is ignored; one whose files no longer match COMPLETE is damaged and
skipped with a warning, for the one before it.

Saving and loading are collectives (every rank calls them); choosing runs in the launching process.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import random
import shutil
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gqa_convert.data.manifest import read_manifest
from gqa_convert.errors import GQAConvertError, one_line
from gqa_convert.train.settings import TrainPlan

COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
_PROBE = 1 << 20  # bytes checksummed at each end of a file


@dataclass
class TrainerState:
    """The trainer's own resumable state: tiny, saved beside the strategy's in each checkpoint."""

    step: int = 0  # optimizer steps done
    tokens: int = 0  # tokens trained on, all processes

    def state_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def token_data_identity(folder: str) -> str:
    """The tokens a run reads, named by content (token count and shard list), not by where they lie."""
    manifest = read_manifest(Path(folder))
    shards = json.dumps(manifest["shards"], sort_keys=True).encode()
    return f"{manifest['tokens']} tokens (shards {hashlib.sha256(shards).hexdigest()[:12]})"


def run_identity(plan: TrainPlan) -> dict[str, Any]:
    """What a resumed run must share with its checkpoint: the data order and the budget are functions of
    these. The world size counts only where the checkpoint cannot be resharded (DeepSpeed)."""
    settings = plan.settings
    return {
        "seq_len": settings.seq_len,
        "global_batch": plan.global_batch,
        "data": token_data_identity(plan.train_tokens),
        "steps": plan.steps,
        "seed": settings.seed,
        "format": "deepspeed" if plan.strategy == "deepspeed" else "dcp",
        "world": plan.world_size,
    }


def save_checkpoint(strategy: Any, out: Path, state: TrainerState, plan: TrainPlan) -> Path:
    """Collective. On any failure the partial folder is removed (best effort) and the error raised."""
    folder = checkpoint_dir(out, state.step)
    main = dist.get_rank() == 0
    if main and folder.exists():  # left by a run killed mid-save, or a damaged one being replaced
        shutil.rmtree(folder)
    dist.barrier()
    try:
        strategy.save_state(folder)
        if strategy.checkpoint_format == "dcp":
            save_rng_state(folder / f"rng-rank{dist.get_rank()}.safetensors")
        dist.barrier()
        if main:
            trainer_state = {**state.state_dict(), "run": run_identity(plan)}
            (folder / TRAINER_STATE).write_text(json.dumps(trainer_state))
            _write_manifest(folder)
    except BaseException:
        if main:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    dist.barrier()
    return folder


def load_checkpoint(strategy: Any, folder: Path, world: int) -> TrainerState:
    """Restore the strategy's state (resharded by DCP onto another world size) and, when the world size
    is the one it was saved with, each rank's RNG state."""
    saved = json.loads((folder / TRAINER_STATE).read_text())
    strategy.load_state(folder)
    if strategy.checkpoint_format == "dcp" and saved["run"]["world"] == world:
        load_rng_state(folder / f"rng-rank{dist.get_rank()}.safetensors")
    return TrainerState(step=saved["step"], tokens=saved["tokens"])


def save_rng_state(path: Path) -> None:
    """Every random generator's state, without pickle: the generators' byte and word states as tensors
    in safetensors, Python's and NumPy's scalars as JSON in its metadata."""
    kind, words, position, has_gauss, cached_gaussian = np.random.get_state()
    version, python_words, gauss_next = random.getstate()
    tensors = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(words.astype(np.int64))}
    if torch.cuda.is_available():
        tensors.update({f"cuda.{i}": state for i, state in enumerate(torch.cuda.get_rng_state_all())})
    scalars = {
        "numpy": [kind, int(position), int(has_gauss), float(cached_gaussian)],
        "python": [version, list(python_words), gauss_next],
    }
    save_file(tensors, str(path), metadata={"scalars": json.dumps(scalars)})


def load_rng_state(path: Path) -> None:
    """Restore what save_rng_state wrote; a file of another shape is a damaged checkpoint."""
    try:
        tensors = load_file(str(path))
        with safe_open(str(path), "pt") as handle:
            scalars = json.loads(handle.metadata()["scalars"])
        kind, position, has_gauss, cached_gaussian = scalars["numpy"]
        version, python_words, gauss_next = scalars["python"]
        numpy_state = (kind, tensors["numpy"].numpy().astype(np.uint32), position, has_gauss, cached_gaussian)
        python_state = (version, tuple(python_words), gauss_next)
        torch.set_rng_state(tensors["torch"])
        np.random.set_state(numpy_state)
        random.setstate(python_state)
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, json.JSONDecodeError) as error:
        raise GQAConvertError(
            f"checkpoint {path.parent} is damaged (random generator state {path.name}: {one_line(error)}): "
            "resume from an earlier checkpoint or start afresh with --force"
        ) from None
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---- COMPLETE: sizes and checksums ----
def _checksum(path: Path, size: int) -> str:
    with open(path, "rb") as handle:
        crc = zlib.crc32(handle.read(_PROBE))
        if size > 2 * _PROBE:
            handle.seek(size - _PROBE)
            crc = zlib.crc32(handle.read(_PROBE), crc)
        elif size > _PROBE:
            crc = zlib.crc32(handle.read(), crc)
    return f"{crc:08x}"


def _files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE)


def _write_manifest(folder: Path) -> None:
    files = {}
    for path in _files(folder):
        size = path.stat().st_size
        files[str(path.relative_to(folder))] = {"size": size, "crc32": _checksum(path, size)}
    (folder / COMPLETE).write_text(json.dumps({"files": files}, indent=1))


def check_checkpoint(folder: Path) -> str | None:
    """What is wrong with a complete checkpoint's files, or None when they match COMPLETE."""
    try:
        files = json.loads((folder / COMPLETE).read_text())["files"]
        json.loads((folder / TRAINER_STATE).read_text())["run"]
    except (OSError, ValueError, KeyError, TypeError):
        return "its COMPLETE or trainer_state.json is unreadable or from an older version"
    for name, expected in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        size = path.stat().st_size
        if size != expected["size"]:
            return f"{name} has {size:,} bytes, {expected['size']:,} were written"
        if _checksum(path, size) != expected["crc32"]:
            return f"{name} does not hold the bytes that were written (checksum)"
    return None


def complete_checkpoints(out: Path) -> list[Path]:
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.startswith("step-") and (p / COMPLETE).exists())


def choose_resume(plan: TrainPlan) -> Path | None:
    """The newest intact checkpoint (damaged ones skipped with a warning), checked against this run's
    settings; None to start from the beginning."""
    skipped = []
    for folder in reversed(complete_checkpoints(Path(plan.settings.out))):
        problem = check_checkpoint(folder)
        if problem is None:
            check_compatible(folder, plan)
            return folder
        skipped.append(folder.name)
        warnings.warn(f"checkpoint {folder.name} is damaged ({problem}): skipped", stacklevel=2)
    if skipped:
        warnings.warn("no intact checkpoint is left: training starts from the beginning", stacklevel=2)
    return None


_DESCRIBE = {
    "seq_len": "--seq-len {}",
    "global_batch": "a global batch of {} sequences",
    "data": "data of {}",
    "steps": "{} steps",
    "seed": "--seed {}",
    "format": "a {} checkpoint",
    "world": "{} processes",
}


def check_compatible(folder: Path, plan: TrainPlan) -> None:
    """Refuse, in one line, to resume with settings that change the data order or the budget."""
    saved = json.loads((folder / TRAINER_STATE).read_text())["run"]
    current = run_identity(plan)
    keys = [key for key in _DESCRIBE if key != "world" and saved.get(key) != current[key]]
    if saved.get("format") == "deepspeed" == current["format"] and saved.get("world") != current["world"]:
        keys.append("world")  # DeepSpeed's partitioned files are not resharded
    if keys:
        before = ", ".join(_DESCRIBE[key].format(saved.get(key)) for key in keys)
        now = ", ".join(_DESCRIBE[key].format(current[key]) for key in keys)
        raise GQAConvertError(
            f"--resume: {folder.name} was trained with {before}; this run has {now}. Resume with the "
            "checkpoint's settings (same --seq-len, --micro-batch-size x --grad-accum x processes, data, "
            "token budget and --seed), or start afresh with --force"
        )


def prune_checkpoints(out: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and older folders cut short."""
    complete = complete_checkpoints(out)
    for folder in complete[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)
    if complete:
        for folder in (out / "checkpoints").iterdir():
            if folder.name.startswith("step-") and folder.name < complete[-1].name and folder not in complete:
                shutil.rmtree(folder, ignore_errors=True)


# ---- metrics.jsonl ----
def _parse(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) and "step" in record else None


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """One record per line; a line cut short by a crash is left out."""
    if not path.exists():
        return []
    return [record for line in path.read_text().splitlines() if (record := _parse(line)) is not None]


def trim_metrics(path: Path, step: int) -> None:
    """On resume, drop the lines of steps after the checkpoint (they are trained again) and torn lines."""
    if not path.exists():
        return
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = [record for line in lines if (record := _parse(line)) is not None]
    if len(records) < len(lines):
        warnings.warn(
            f"{path.name}: dropped {len(lines) - len(records)} unreadable line(s) left by a crash", stacklevel=2
        )
    kept = "".join(json.dumps(record) + "\n" for record in records if record["step"] <= step)
    staged = path.with_name(path.name + ".tmp")
    staged.write_text(kept)
    staged.replace(path)


def append_metrics(path: Path, record: dict[str, Any]) -> None:
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
