"""The schema of a token folder's manifest.json, checked field by field when it is read back: required
fields and their types (a bool is not a count), the allowed dtypes, shard files that are plain names
inside the folder (no path separators, no `..`, no link leading out), shard sizes on disk equal to
tokens x itemsize, and totals that agree. Anything else is one line: the folder is damaged."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

from gqa_convert.errors import GQAConvertError

DTYPES = {"uint16": 2, "uint32": 4}
_COUNT, _TEXT, _OBJECT, _LIST = "count", "text", "object", "list"
_TOP = {
    "format_version": _COUNT,
    "tool_version": _TEXT,
    "tokens": _COUNT,
    "documents": _COUNT,
    "dtype": _TEXT,
    "eos_token_id": _COUNT,
    "tokenizer": _OBJECT,
    "shards": _LIST,
    "source": _OBJECT,
}
_OPTIONAL = {"max_token_id": _COUNT, "max_tokens": _COUNT, "job": _OBJECT}
_TOKENIZER = {"fingerprint": _TEXT, "name_or_path": _TEXT, "vocab_size": _COUNT, "eos_token_id": _COUNT}
_SHARD = {"file": _TEXT, "tokens": _COUNT, "documents": _COUNT}
_CHECKS = {
    _COUNT: lambda value: isinstance(value, int) and not isinstance(value, bool) and value >= 0,
    _TEXT: lambda value: isinstance(value, str),
    _OBJECT: lambda value: isinstance(value, dict),
    _LIST: lambda value: isinstance(value, list),
}
_NAMES = {_COUNT: "a count (an integer >= 0)", _TEXT: "a string", _OBJECT: "an object", _LIST: "a list"}


class DamagedTokenFolder(GQAConvertError):
    """A token folder whose manifest or shards are not what the format says."""

    def __init__(self, folder: str, why: str) -> None:
        super().__init__(folder, why)
        self.folder, self.why = folder, why

    def __str__(self) -> str:
        return f"token folder {self.folder} is damaged ({self.why}): tokenize again"


def damaged(folder: Path, why: str) -> DamagedTokenFolder:
    return DamagedTokenFolder(str(folder), why)


def _check_fields(record: Any, fields: dict[str, str], where: str, folder: Path, required: bool = True) -> None:
    if not isinstance(record, dict):
        raise damaged(folder, f"{where} is not an object")
    for name, kind in fields.items():
        if name not in record:
            if required:
                raise damaged(folder, f"{where} lacks '{name}'")
            continue
        if record[name] is None and not required:
            continue
        if not _CHECKS[kind](record[name]):
            raise damaged(folder, f"{where} '{name}' is {record[name]!r:.40}, not {_NAMES[kind]}")


def plain_file(folder: Path, name: str, what: str) -> Path:
    """folder/name, where name is a plain file name and the file (through a link, if one) lies in folder."""
    if name in ("", ".", "..") or any(separator in name for separator in ("/", "\\", "\x00")):
        raise damaged(folder, f"{what} '{name}' is not a plain file name")
    path = folder / name
    try:
        status = os.lstat(path)
        if stat.S_ISLNK(status.st_mode):
            if path.resolve().parent != folder.resolve():
                raise damaged(folder, f"{what} {name} is a link leading out of the folder")
            status = os.stat(path)
    except FileNotFoundError:
        raise damaged(folder, f"{what} {name} is missing") from None
    except (OSError, RuntimeError) as error:  # RuntimeError: a loop of links
        raise damaged(folder, f"{what} {name} cannot be read: {error}") from None
    if not stat.S_ISREG(status.st_mode):
        raise damaged(folder, f"{what} {name} is not a regular file")
    return path


def check_manifest(manifest: Any, folder: Path) -> dict[str, Any]:
    """The manifest, once every field, shard and size is what the format says."""
    _check_fields(manifest, _TOP, "manifest.json", folder)
    _check_fields(manifest, _OPTIONAL, "manifest.json", folder, required=False)
    _check_fields(manifest["tokenizer"], _TOKENIZER, "the tokenizer entry", folder)
    itemsize = DTYPES.get(manifest["dtype"])
    if itemsize is None:
        raise damaged(folder, f"dtype '{manifest['dtype']:.20}' is not one of {', '.join(DTYPES)}")
    largest = (1 << (8 * itemsize)) - 1
    if manifest["eos_token_id"] != manifest["tokenizer"]["eos_token_id"] or manifest["eos_token_id"] > largest:
        raise damaged(folder, f"eos_token_id {manifest['eos_token_id']} does not fit the tokenizer or the dtype")
    if manifest.get("max_token_id") is not None and manifest["max_token_id"] > largest:
        raise damaged(folder, f"max_token_id {manifest['max_token_id']} does not fit {manifest['dtype']}")
    files: set[str] = set()
    for number, shard in enumerate(manifest["shards"], 1):
        _check_fields(shard, _SHARD, f"shard {number}", folder)
        if shard["file"] in files:
            raise damaged(folder, f"shard file {shard['file']} is listed twice")
        files.add(shard["file"])
        size = plain_file(folder, shard["file"], "shard file").stat().st_size
        if size != shard["tokens"] * itemsize:
            raise damaged(
                folder, f"shard file {shard['file']} holds {size} bytes, not {shard['tokens']} tokens x {itemsize}"
            )
    for total in ("tokens", "documents"):
        listed = sum(shard[total] for shard in manifest["shards"])
        if listed != manifest[total]:
            raise damaged(folder, f"the shards hold {listed} {total}, the manifest says {manifest[total]}")
    return manifest
