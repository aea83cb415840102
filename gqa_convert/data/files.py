"""The files of a corpus given as a local path: a file, or a folder walked in name order.

Symbolic links are followed (to files and to folders); each file is listed once however many paths
reach it (by device and inode, so hard links and a folder linked twice count once), and a link back
to a folder being walked is not entered again. Hidden names (starting with a dot) are skipped, as are
their contents. Anything that cannot be listed or read as a file (a broken link, a pipe, a socket, a
device, a folder we may not list) is refused with one line naming it: nothing is skipped without a word.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from gqa_convert.data.manifest import is_token_folder
from gqa_convert.errors import GQAConvertError

TABLE_LOADERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv", ".arrow": "arrow"}


def file_kind(file: Path) -> str:
    """'text', or the datasets loader of a table file."""
    return TABLE_LOADERS.get(file.suffix.lower(), "text")


def changed_error(path: Path | str) -> GQAConvertError:
    return GQAConvertError(
        f"{path} changed while it was tokenized (its size or modification time is not what it was when the run "
        "started): tokenize again once nothing writes it"
    )


def _stat(path: Path) -> os.stat_result:
    """The status of what `path` leads to (through links), or one line saying why there is none."""
    try:
        return path.stat()
    except FileNotFoundError:
        if path.is_symlink():
            raise GQAConvertError(
                f"{path} is a broken symbolic link (to {os.readlink(path)}): fix it or remove it"
            ) from None
        raise GQAConvertError(f"{path} disappeared while the corpus was listed: run again once it is stable") from None
    except OSError as error:
        raise GQAConvertError(f"cannot read {path} ({error.strerror}): make it readable") from None


def _entries(folder: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError as error:
        raise GQAConvertError(f"cannot list the folder {folder} ({error.strerror}): make it readable") from None


def _walk(folder: Path, folders: set[tuple[int, int]], files: dict[tuple[int, int], Path]) -> None:
    for entry in _entries(folder):
        if entry.name.startswith("."):
            continue
        path = Path(entry.path)
        status = _stat(path)
        key = (status.st_dev, status.st_ino)
        if stat.S_ISDIR(status.st_mode):
            if key not in folders:  # a folder reached again (a link back up, or linked twice): walked once
                folders.add(key)
                _walk(path, folders, files)
        elif stat.S_ISREG(status.st_mode):
            files.setdefault(key, path)
        else:
            raise GQAConvertError(
                f"{path} is not a regular file (a pipe, socket or device): move it out of the corpus folder"
            )


def local_files(data: Path) -> list[Path]:
    """The data files of a file or folder (one kind per folder), in name order."""
    status = _stat(data)
    if stat.S_ISREG(status.st_mode):
        return [data]
    if not stat.S_ISDIR(status.st_mode):
        raise GQAConvertError(f"{data} is not a regular file or folder (a pipe, socket or device): give a file")
    if is_token_folder(data):
        raise GQAConvertError(
            f"{data} is a token folder (made by gqa-convert tokenize) and this reads text: give the text it was "
            "made from (a text file, a table, or a folder of them); uptrain --data reads token folders directly"
        )
    files: dict[tuple[int, int], Path] = {}
    _walk(data, {(status.st_dev, status.st_ino)}, files)
    if not files:
        raise GQAConvertError(f"{data} holds no data files (hidden files are skipped)")
    listed = list(files.values())
    kinds = {file_kind(p) for p in listed}
    if len(kinds) > 1:
        raise GQAConvertError(f"{data} mixes file types ({', '.join(sorted(kinds))}): keep one type per folder")
    return listed
