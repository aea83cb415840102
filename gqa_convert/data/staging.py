"""The staging folder of a tokenization (`.NAME.partial` beside the target): locked against a second
run, resumed by a rerun of the same job, renamed into place at the end; and what is kept of it when
the disk refuses a read or a write.

On an OSError (a full disk, a permission, a read-only or failing device), whether in this process or
in a worker, every temporary file is removed and the finished units are kept (whole shards with their
records: work that a rerun of the same command resumes), and the one-line error says where they are,
how large, and what to free; with no finished unit the staging folder is removed altogether.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gqa_convert.data.manifest import MANIFEST, write_json_atomic
from gqa_convert.data.units import WorkUnit
from gqa_convert.data.worker import UnitIOError, finished_record, shard_name
from gqa_convert.errors import DISK_FULL_ERRNOS, GQAConvertError

JOB_FILE = "job.json"
LOCK_FILE = ".lock"
_NOT_ALLOWED = (errno.EACCES, errno.EPERM, errno.EROFS)


def staging_of(final: Path) -> Path:
    return final.parent / f".{final.name.lstrip('.')}.partial"


def _read_job(path: Path) -> Any:
    try:
        return json.loads(path.read_bytes()[: 1 << 20])
    except (OSError, ValueError):
        return None  # damaged: not this job


@contextlib.contextmanager
def staging_for(staging: Path, job: dict[str, Any], force: bool) -> Iterator[None]:
    """The staging folder, locked against a second run: fresh, or the one an interrupted run of the
    same job left (resumed). Another job's unfinished folder is cleared only with force."""
    if staging.is_symlink() or (staging.exists() and not staging.is_dir()):
        raise GQAConvertError(f"{staging} exists and is not a folder gqa-convert tokenize made: move it away")
    if staging.exists() and not (staging / JOB_FILE).is_file() and any(p.name != LOCK_FILE for p in staging.iterdir()):
        raise GQAConvertError(f"{staging} exists and was not written by gqa-convert tokenize: move it away")
    staging.mkdir(parents=True, exist_ok=True)
    with open(staging / LOCK_FILE, "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GQAConvertError(f"another tokenization is writing {staging}: wait for it to end") from None
        job_file = staging / JOB_FILE
        if job_file.is_file() and _read_job(job_file) != job:
            if not force:
                raise GQAConvertError(
                    f"{staging} holds an unfinished tokenization of other data or settings: pass --force to start again"
                )
            for path in staging.iterdir():
                if path.name != LOCK_FILE:
                    path.unlink()
        write_json_atomic(job_file, job)
        yield


def finalize(staging: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Write the manifest, keep only the listed shards, and rename the folder into place. (The
    records stay until the manifest is written: a failure there leaves every unit to resume.)"""
    write_json_atomic(staging / MANIFEST, manifest)
    kept = {record["file"] for record in manifest["shards"]}
    for path in staging.iterdir():
        if path.name != MANIFEST and path.name not in kept:
            path.unlink()
    if final.exists():  # replaced (the caller checked it may be)
        trash = final.parent / f".{final.name.lstrip('.')}.old"
        shutil.rmtree(trash, ignore_errors=True)
        final.rename(trash)
        staging.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(final)


def _megabytes(size: float) -> str:
    return f"{size / 1e6:,.1f} MB" if size >= 1e5 else f"{size / 1e3:,.1f} kB"


def _input_bytes(unit: WorkUnit) -> int | None:
    return unit.end - unit.start if unit.kind in ("text", "jsonl") else None


def _still_needed(units: list[WorkUnit], kept: list[WorkUnit], kept_bytes: int) -> str:
    """About how many more bytes the shards not yet written need, judged from those written."""
    sizes = [_input_bytes(unit) for unit in units]
    if not kept or None in sizes:
        return ""
    done = {unit.index for unit in kept}
    read = sum(size for unit, size in zip(units, sizes) if unit.index in done and size)
    left = sum(size for unit, size in zip(units, sizes) if unit.index not in done and size)
    return f" (about {_megabytes(kept_bytes / read * left)} more)" if read else ""


def remove_temporary(staging: Path) -> None:
    """The files a unit or a record was being written to (a worker stopped mid-write leaves one)."""
    if staging.is_dir() and not staging.is_symlink():
        for leftover in staging.glob(".*.tmp"):
            leftover.unlink(missing_ok=True)


def io_failure(error: OSError | UnitIOError, staging: Path, units: list[WorkUnit], itemsize: int) -> GQAConvertError:
    """Clean the staging folder after an OSError (temporary files out, finished units kept) and say so."""
    if isinstance(error, UnitIOError):
        path, code, action = error.path, error.errno_value, error.action
    else:
        path, code, action = str(error.filename or staging), error.errno, "write"
    if Path(path).parent == staging:  # a shard, record or temporary file: the folder says more
        path = str(staging)
    kept, kept_bytes = [], 0
    remove_temporary(staging)
    if staging.is_dir() and not staging.is_symlink():
        for unit in units:
            record = finished_record(staging, unit.index, itemsize)
            if record is not None:
                kept.append(unit)
                kept_bytes += record["tokens"] * itemsize
        finished = {shard_name(unit.index) for unit in kept}
        for shard in staging.glob("shard-*.tokens"):  # a shard whose record was not written: redone
            if shard.name not in finished:
                shard.unlink(missing_ok=True)
    if kept:
        where = (
            f"the {len(kept)} finished units of {len(units)} ({_megabytes(kept_bytes)}) stay in {staging} and a rerun "
            "of the same command resumes them (delete that folder to start over)"
        )
    else:
        shutil.rmtree(staging, ignore_errors=True)
        where = "nothing was kept"
    if code in DISK_FULL_ERRNOS:
        fix = f"free space on the disk of {staging.parent}{_still_needed(units, kept, kept_bytes)}"
    elif code in _NOT_ALLOWED:
        where_to = path if action == "read" or Path(path).exists() else str(Path(path).parent)
        fix = f"make {where_to} {'readable' if action == 'read' else 'writable'}"
    else:
        fix = "check the disk"
    reason = os.strerror(code) if code else "input/output error"
    return GQAConvertError(f"cannot {action} {path} ({reason}); {where}: {fix}, then run the same command again")
