"""Training checkpoints: OUT/checkpoints/step-NNNNNNNN, the choice of the one to resume from, pruning.

A checkpoint folder holds the strategy's state (ddp and fsdp2: safetensors pieces and a JSON index,
see .storage; deepspeed: DeepSpeed's own files), each process's RNG state (safetensors, scalars in
its JSON metadata), trainer_state.json (the trainer's own state, step and tokens, and the identity of
the run, see .contract) and, written last, COMPLETE: the size and a checksum (CRC32 of the first and
last MiB) of every other file. A folder without COMPLETE was cut short and is ignored; one whose files
no longer match it, or whose JSON is not what this version writes, is damaged and skipped with a
warning, for the one before it. Nothing here is read with pickle.

Saving and loading are collectives (every process calls them); choosing runs before the workers start.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gqa_convert.errors import GQAConvertError, one_line
from gqa_convert.train.checkpoint.storage import Damaged, damaged, read_index

COMPLETE = "COMPLETE"
TRAINER_STATE = "trainer_state.json"
FORMAT_VERSION = 2  # version 1 kept torch.distributed.checkpoint's pickles: not read
MAX_JSON_BYTES = 64 << 20
_PROBE = 1 << 20  # bytes checksummed at each end of a file
_STEP = re.compile(r"step-(\d{8})")


def checkpoint_dir(out: Path, step: int) -> Path:
    return out / "checkpoints" / f"step-{step:08d}"


def save_checkpoint(strategy: Any, folder: Path, state: dict[str, int], identity: dict[str, Any], fmt: str) -> None:
    """Collective. On any failure the partial folder is removed (best effort) and the error raised."""
    import torch.distributed as dist

    main = dist.get_rank() == 0
    if main and (folder.is_symlink() or folder.is_file()):
        folder.unlink()  # a stray entry under this checkpoint's name (a link is removed, not what it points to)
    elif main and folder.exists():  # left by a run killed mid-save, or a damaged one being replaced
        shutil.rmtree(folder)
    dist.barrier()
    try:
        strategy.save_state(folder)
        if fmt == "dcp":
            save_rng_state(folder / f"rng-rank{dist.get_rank()}.safetensors")
        dist.barrier()
        if main:
            _write_json(folder / TRAINER_STATE, {"format_version": FORMAT_VERSION, **state, "run": identity})
            _write_json(folder / COMPLETE, {"files": _sizes_and_checksums(folder)})
    except BaseException:
        if main:
            shutil.rmtree(folder, ignore_errors=True)
        raise
    dist.barrier()


def load_checkpoint(strategy: Any, folder: Path, world: int, fmt: str) -> dict[str, int]:
    """Collective: restore the strategy's state (resharded onto another world size where the format
    allows) and, when the world size is the one it was saved with, each process's RNG state. Returns
    the trainer's state (step, tokens)."""
    import torch.distributed as dist

    saved = read_trainer_state(folder)
    strategy.load_state(folder)
    if fmt == "dcp" and saved["run"].get("world") == world:
        load_rng_state(folder / f"rng-rank{dist.get_rank()}.safetensors")
    return {"step": saved["step"], "tokens": saved["tokens"]}


# ---- random generators, without pickle ----
def save_rng_state(path: Path) -> None:
    """Every random generator's state: byte and word states as tensors in safetensors, Python's and
    NumPy's scalars as JSON in its metadata."""
    import torch
    from safetensors.torch import save_file

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
    import torch
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

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
    except (SafetensorError, OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError) as error:
        raise damaged(path.parent, f"random generator state {path.name}: {one_line(error)[:120]}") from None
    cuda = [tensors[f"cuda.{i}"] for i in range(len(tensors)) if f"cuda.{i}" in tensors]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


# ---- JSON we wrote, read back with its schema ----
def _write_json(path: Path, value: Any) -> None:
    staged = path.with_name(f".{path.name}.tmp")
    staged.write_text(json.dumps(value, indent=1))
    staged.replace(path)


def _read_json(path: Path) -> Any:
    if path.is_symlink() or not path.is_file():
        raise damaged(path.parent, f"{path.name} is missing")
    try:
        if path.stat().st_size > MAX_JSON_BYTES:
            raise damaged(path.parent, f"{path.name} is larger than anything this tool writes")
        return json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as error:
        raise damaged(path.parent, f"{path.name} is unreadable: {one_line(error)[:100]}") from None


def _count(value: Any, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def read_trainer_state(folder: Path) -> dict[str, Any]:
    """trainer_state.json: this version's format, whole step and token counts, the run's identity."""
    state = _read_json(folder / TRAINER_STATE)
    if not isinstance(state, dict):
        raise damaged(folder, f"{TRAINER_STATE} is not what this tool writes")
    version = state.get("format_version")
    if version is None:
        raise GQAConvertError(
            f"checkpoint {folder.name} was written by an earlier gqa-convert, whose checkpoint files are pickles, "
            "which this version does not read: finish that run with the version that began it, or start afresh "
            "with --force"
        )
    if version != FORMAT_VERSION:
        raise GQAConvertError(
            f"checkpoint {folder.name} is of checkpoint format {str(version)[:20]}, this gqa-convert reads format "
            f"{FORMAT_VERSION}: resume it with the version that wrote it, or start afresh with --force"
        )
    match = _STEP.fullmatch(folder.name)
    if not (_count(state.get("step"), 1) and _count(state.get("tokens")) and isinstance(state.get("run"), dict)):
        raise damaged(folder, f"{TRAINER_STATE} lacks its step, tokens or run")
    if match is None or int(match.group(1)) != state["step"]:
        raise damaged(folder, f"{TRAINER_STATE} is of step {state['step']}, not of this folder")
    return state


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


def _sizes_and_checksums(folder: Path) -> dict[str, dict[str, Any]]:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file() and p.name != COMPLETE):
        size = path.stat().st_size
        files[path.relative_to(folder).as_posix()] = {"size": size, "crc32": _checksum(path, size)}
    return files


def _plain_name(name: Any, folder: Path) -> bool:
    """A relative path of plain parts inside the folder, through no link."""
    if not isinstance(name, str) or not name or name.startswith("/") or "\\" in name:
        return False
    parts = name.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return False
    path = folder
    for part in parts:
        path = path / part
        if path.is_symlink():
            return False
    return True


def check_checkpoint(folder: Path) -> str | None:
    """What is wrong with a complete checkpoint, or None when its files match COMPLETE and its JSON is
    what this version writes. A checkpoint of an earlier version raises GQAConvertError."""
    try:
        complete = _read_json(folder / COMPLETE)
        files = complete.get("files") if isinstance(complete, dict) else None
        if not isinstance(files, dict):
            raise damaged(folder, f"{COMPLETE} lists no files")
        for name, expected in files.items():
            if not _plain_name(name, folder):
                return f"{COMPLETE} names {str(name)[:80]!r}, not a file inside the checkpoint"
            ok = isinstance(expected, dict) and _count(expected.get("size")) and isinstance(expected.get("crc32"), str)
            if not ok:
                return f"{COMPLETE} has no size and checksum for {name}"
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            size = path.stat().st_size
            if size != expected["size"]:
                return f"{name} has {size:,} bytes, {expected['size']:,} were written"
            if _checksum(path, size) != expected["crc32"]:
                return f"{name} does not hold the bytes that were written (checksum)"
        state = read_trainer_state(folder)
        if state["run"].get("format") != "deepspeed":
            read_index(folder)
    except Damaged as error:
        return error.what
    except OSError as error:
        return f"unreadable ({error.strerror})"
    return None


def complete_checkpoints(out: Path) -> list[Path]:
    folder = out / "checkpoints"
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        if _STEP.fullmatch(path.name) and (path / COMPLETE).exists():
            if path.is_symlink():  # what it holds lies outside OUT: never read, never removed
                warnings.warn(f"checkpoint {path.name} is a link to {os.readlink(path)}: skipped", stacklevel=3)
            else:
                found.append(path)
    return found


@dataclass(frozen=True)
class Resumable:
    """The checkpoint --resume continues from: its folder, step, and the run identity it recorded."""

    folder: Path
    step: int
    run: dict[str, Any]


def newest_intact(out: Path, trust_deepspeed: bool) -> Resumable | None:
    """The newest intact checkpoint of OUT (damaged ones skipped with a warning); None when OUT holds
    none yet (the run stopped before its first). Refused in one line when every one is damaged, or it
    is a DeepSpeed checkpoint (pickles) without trust_deepspeed. Its identity is checked by the caller
    (contract.check_compatible)."""
    skipped, found = [], complete_checkpoints(out)
    if not found:
        warnings.warn(f"--resume: {out} holds no checkpoint yet: training starts from the beginning", stacklevel=2)
    for folder in reversed(found):
        problem = check_checkpoint(folder)
        if problem is None:
            saved = read_trainer_state(folder)
            if saved["run"].get("format") == "deepspeed" and not trust_deepspeed:
                raise GQAConvertError(
                    f"--resume: {folder.name} is a DeepSpeed checkpoint, whose files are pickles that run code when "
                    "loaded: pass --trust-deepspeed-checkpoint if you wrote it and no one else can write "
                    f"{out}; else start afresh with --force (ddp and fsdp2 checkpoints hold no code)"
                )
            return Resumable(folder, saved["step"], saved["run"])
        skipped.append(f"{folder.name}: {problem}")
        warnings.warn(f"checkpoint {folder.name} is damaged ({problem}): skipped", stacklevel=2)
    if skipped:  # never start over silently: the damaged ones would be pruned as training goes on
        raise GQAConvertError(
            f"--resume: no intact checkpoint in {out} ({'; '.join(skipped)[:400]}): restore one, or start afresh "
            "with --force"
        )
    return None


def prune_checkpoints(out: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; drop older ones and older folders cut short."""
    complete = complete_checkpoints(out)
    for folder in complete[:-keep]:
        shutil.rmtree(folder, ignore_errors=True)
    if complete:
        for folder in (out / "checkpoints").iterdir():
            if _STEP.fullmatch(folder.name) and folder.name < complete[-1].name and folder not in complete:
                shutil.rmtree(folder, ignore_errors=True)
