"""Output folders: checks before any work (never over the source, never over a user's files without
leave), and atomic writing (staged beside the target, renamed at the end, removed on any failure)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from gqa_convert.errors import GQAConvertError, is_disk_full


def check_output_folder(
    out: Path, source: Path | None, may_replace: bool, fix: str = "pass --force to replace it"
) -> None:
    """Refuse an output that would overwrite the source or a user's files; nothing is touched.
    `fix` says how to allow a non-empty OUT (--force for pool, --resume or --force for uptrain)."""
    out = out.resolve()
    if source is not None:
        source = source.resolve()
        source_dir = source if source.is_dir() else source.parent
        if out == source_dir or source_dir in out.parents:
            raise GQAConvertError(f"output {out} is inside the source {source_dir}: choose a folder outside it")
        if source.is_dir() and out in source.parents:
            raise GQAConvertError(f"output {out} contains the source {source}: choose another folder")
    if out.exists() and not out.is_dir():
        raise GQAConvertError(f"output {out} exists and is a file: choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not may_replace:
        raise GQAConvertError(f"output folder {out} is not empty: {fix}")


def disk_full_error(error: OSError, out: Path) -> GQAConvertError:
    return GQAConvertError(
        f"no space left while writing {out.name} ({os.strerror(error.errno)}); "
        f"nothing was written to {out}: free space and run again"
    )


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out`, on failure it is removed."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield staging
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if is_disk_full(error):
            raise disk_full_error(error, out) from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(trash / "old")
        staging.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        staging.rename(out)
