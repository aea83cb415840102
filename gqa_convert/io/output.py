"""Output folders: the checks done before any work (never over the source, the current directory, or
files this tool did not write), one writer per folder (a lock file beside OUT), and atomic writing
(staged beside the target, renamed at the end, removed on any failure or, when its writer died, by
the next run). Everything is created with the permissions of a plain mkdir under the user's umask."""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import fnmatch
import json
import os
import re
import secrets
import shutil
import socket
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path

from gqa_convert.errors import GQAConvertError, is_disk_full, one_line
from gqa_convert.io.names import OWNED_NAMES, TRAINING_MARKERS
from gqa_convert.io.provenance import PROVENANCE_FILE

# Work folders beside OUT: .OUT.<kind>-<host>-<pid>-<random>; host and pid tell whether their writer
# still runs (OUT may be on a file system that several machines share).
WORK_KINDS = ("tmp", "old", "calib", "data")
_NOT_WRITABLE = (errno.EACCES, errno.EPERM, errno.EROFS)
THIS_HOST = re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:64] or "host"
_LISTED = 5
# How a command writes OUT: a staged folder renamed onto it (pool, expand, tokenize), in place
# (uptrain: a new run, its resumption, or a machine of rank > 0 joining the run rank 0 started).
MODES = ("replace", "train", "resume", "join")


def guard_output(
    out: Path,
    *,
    inputs: Iterable[str | Path | None] = (),
    force: bool = False,
    mode: str = "replace",
    fix: str = "pass --force to replace it",
) -> None:
    """The one check every command that writes runs before any work; nothing is touched.

    - No input (model, data, calibration text, teacher, evaluation data, config file) lies inside OUT,
      and OUT lies inside no input folder: writing or replacing OUT can never delete or feed an input.
    - OUT is not the current directory or a folder holding it, nor a file or below one.
    - A non-empty OUT is replaced (`force`, modes replace and train) only when everything in it is a
      name this tool writes (OWNED_NAMES) and it carries the tool's marker; else nothing is replaced.
    - resume: OUT must hold an uptraining run (its checkpoints), not just any model.
    - join: OUT is rank 0's run; nothing is replaced here.
    """
    assert mode in MODES, mode
    out = out.resolve()
    for given in inputs:
        _check_apart(out, given)
    cwd = Path.cwd().resolve()
    if mode in ("replace", "train") and (out == cwd or out in cwd.parents):
        raise GQAConvertError(f"output {out} is the current directory or holds it: choose a new folder, e.g. -o ./out")
    for folder in (out, *out.parents):
        if folder.exists() and not folder.is_dir():
            raise GQAConvertError(f"output {out}: {folder} exists and is a file; choose a folder path")
    filled = out.is_dir() and any(out.iterdir())
    if mode == "resume":
        if not (out / TRAINING_MARKERS[1]).is_dir():
            what = "is empty" if not filled else "holds no uptraining run (no checkpoints/)"
            raise GQAConvertError(
                f"--resume: output folder {out} {what}: there is nothing to resume; run without --resume"
            )
        _check_owned(out, "--resume writes into it")
    elif mode in ("replace", "train") and filled:
        if not force:
            raise GQAConvertError(f"output folder {out} is not empty: {fix}")
        _check_owned(out, "--force replaces only an empty folder or one this tool wrote")
    _check_writable(out, in_place=mode != "replace")


def _check_apart(out: Path, given: str | Path | None) -> None:
    """An input and OUT must not lie inside each other (a file input may sit beside OUT)."""
    if given is None or not Path(given).exists():  # a Hub id, or a path checked elsewhere
        return
    path = Path(given).resolve()
    if out == path:
        raise GQAConvertError(f"output {out} is the input {given}: choose another output folder")
    if out in path.parents:
        raise GQAConvertError(
            f"input {given} lies inside the output folder {out}, which this command writes or replaces: "
            "move the input out of it or choose another output folder"
        )
    if path.is_dir() and path in out.parents:
        raise GQAConvertError(f"output {out} is inside the input folder {given}: choose a folder outside it")


def _check_owned(out: Path, why: str) -> None:
    foreign = foreign_entries(out)
    if foreign or not has_tool_marker(out):
        shown = ", ".join(foreign[:_LISTED]) + (f" and {len(foreign) - _LISTED} more" if len(foreign) > _LISTED else "")
        held = f" ({shown})" if foreign else ""
        raise GQAConvertError(
            f"output folder {out} holds files gqa-convert did not write{held}; {why}: choose a new folder"
        )


def _check_writable(out: Path, in_place: bool) -> None:
    existing = next(folder for folder in out.parents if folder.exists())
    if not os.access(existing, os.W_OK | os.X_OK):
        raise GQAConvertError(f"cannot write in {existing} (permission denied or read-only): choose another folder")
    if in_place and out.is_dir() and not os.access(out, os.W_OK | os.X_OK):
        raise GQAConvertError(f"cannot write in {out} (permission denied or read-only): choose another folder")


def foreign_entries(folder: Path) -> list[str]:
    """The entries at the top of `folder` that are not names this tool writes (sorted)."""
    try:
        names = sorted(os.listdir(folder))
    except OSError:
        return []
    return [name for name in names if not any(fnmatch.fnmatchcase(name, pattern) for pattern in OWNED_NAMES)]


def has_tool_marker(folder: Path) -> bool:
    """A conversion's output (its provenance names this tool), a token folder, or an uptraining run's folder."""
    with contextlib.suppress(OSError, UnicodeDecodeError, json.JSONDecodeError):
        record = json.loads((folder / PROVENANCE_FILE).read_text())
        if isinstance(record, dict) and record.get("tool") == "gqa-convert":
            return True
    if _is_token_folder(folder):
        return True
    if (folder / TRAINING_MARKERS[0]).is_file() or (folder / TRAINING_MARKERS[1]).is_dir():
        return True
    data = folder / "data"  # tokenized data moved in before the first step
    return data.is_dir() and any(data.iterdir()) and all(_is_token_folder(p) for p in data.iterdir())


def written_by_tool(folder: Path) -> bool:
    """Everything in `folder` is what this tool writes, and it carries the tool's marker."""
    return has_tool_marker(folder) and not foreign_entries(folder)


def _is_token_folder(folder: Path) -> bool:
    """A folder `gqa-convert tokenize` wrote: its manifest says which version wrote it."""
    with contextlib.suppress(OSError, UnicodeDecodeError, json.JSONDecodeError):
        manifest = json.loads((folder / "manifest.json").read_text())
        return isinstance(manifest, dict) and "tool_version" in manifest and "format_version" in manifest
    return False


def clear_output_folder(out: Path) -> None:
    """Remove OUT for --force: only an empty folder or one this tool wrote (checked again here)."""
    if out.is_dir() and any(out.iterdir()):
        _check_owned(out, "--force replaces only an empty folder or one this tool wrote")
    if out.is_dir():
        shutil.rmtree(out)


def disk_full_error(error: OSError, out: Path) -> GQAConvertError:
    return GQAConvertError(
        f"no space left while writing {out.name} ({os.strerror(error.errno)}); "
        f"nothing was written to {out}: free space and run again"
    )


def write_error(error: OSError, out: Path) -> GQAConvertError | None:
    """The one-line error for a refused write (full disk, permission, read-only), or None."""
    if is_disk_full(error):
        return disk_full_error(error, out)
    if error.errno in _NOT_WRITABLE:
        return GQAConvertError(
            f"cannot write {out} ({os.strerror(error.errno)}); nothing was written: choose a folder you can write to"
        )
    return None


def work_name(out: Path, kind: str) -> Path:
    """A fresh path beside OUT for this process's work of one kind."""
    assert kind in WORK_KINDS, kind
    return out.parent / f".{out.name}.{kind}-{THIS_HOST}-{os.getpid()}-{secrets.token_hex(4)}"


@contextlib.contextmanager
def work_folder(out: Path, kind: str) -> Iterator[Path]:
    """A new work folder beside OUT, made like a plain mkdir (the umask decides its mode) and removed
    when the block ends, however it ends."""
    path = work_name(out.resolve(), kind)
    try:
        _make(path)
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _make(path: Path) -> None:
    """Called inside the try that removes `path`: a signal arriving as mkdir returns cannot leave it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.mkdir()


def remove_stale_work(out: Path) -> list[Path]:
    """Remove the work folders beside OUT left by dead runs of this machine (killed, or it restarted)."""
    out = out.resolve()
    kinds = "|".join(WORK_KINDS)
    pattern = re.compile(rf"^\.{re.escape(out.name)}\.(?:{kinds})-{re.escape(THIS_HOST)}-(\d+)-[0-9a-f]{{8}}$")
    removed = []
    if not out.parent.is_dir():
        return removed
    for path in sorted(out.parent.iterdir()):
        match = pattern.match(path.name)
        if match and path.is_dir() and not path.is_symlink() and not _alive(int(match.group(1))):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _lock_path(out: Path) -> Path:
    return out.parent / f".{out.name}.lock"


@contextlib.contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold OUT for one writer: a second one is refused with one line naming the first. Stale work
    folders of dead runs are removed once the lock is held."""
    out = out.resolve()
    lock = _lock_path(out)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd = _acquire(lock, out)
    except OSError as error:
        raise (write_error(error, out) or error) from None
    try:
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)}
        holder["started"] = dt.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(holder).encode())
        remove_stale_work(out)
        yield
    finally:
        with contextlib.suppress(OSError):
            lock.unlink()  # before unlocking: a waiter then sees the file gone and retries
        os.close(fd)


def _acquire(lock: Path, out: Path) -> int:
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise GQAConvertError(
                f"output {out} is being written by another gqa-convert run ({holder}): "
                "wait for it to finish or choose another folder"
            ) from None
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)  # its last holder removed the file after we opened it: lock the new one


def _read_holder(fd: int) -> str:
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return f"pid {holder['pid']} on {holder['host']}, started {holder['started']}: {one_line(holder['command'])}"
    except (OSError, ValueError, KeyError, TypeError):
        return "details not yet written"


@contextlib.contextmanager
def staged_output(out: Path, force: bool = False) -> Iterator[Path]:
    """Yield a work folder beside `out`; on success it replaces `out`, on any failure it is removed.
    The caller holds output_lock(out); OUT is checked again before it is replaced, as it may have
    changed while the work ran."""
    out = out.resolve()
    staging = work_name(out, "tmp")
    try:
        _make(staging)
        yield staging
        _check_still_replaceable(out, force)
        _replace(out, staging)
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        raise (write_error(error, out) or error) from None
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _check_still_replaceable(out: Path, force: bool) -> None:
    if out.is_dir() and any(out.iterdir()) and not (force and written_by_tool(out)):
        raise GQAConvertError(
            f"output folder {out} was filled by someone else while this run worked; nothing was replaced: "
            "choose a new folder"
        )


def _replace(out: Path, staging: Path) -> None:
    if not out.exists():
        staging.rename(out)
        return
    old = work_name(out, "old")
    out.rename(old)  # a kill between the two renames leaves .OUT.old-*, removed by the next run
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
