""".jsonl files read by byte range: one JSON object per line, its text column a string (or empty or
null: an empty document, skipped). A bad row is refused with one line naming the file, the line and
its byte offset."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gqa_convert.data.files import changed_error
from gqa_convert.data.text import document_text
from gqa_convert.errors import GQAConvertError

_COUNT_BYTES = 1 << 20


def _line_number(file: Path, offset: int) -> int:
    """The 1-based number of the line starting at byte `offset` (counted a bounded piece at a time;
    only when a row is refused)."""
    breaks, position = 0, 0
    with open(file, "rb") as handle:
        while position < offset:
            chunk = handle.read(min(_COUNT_BYTES, offset - position))
            if not chunk:
                break
            breaks += chunk.count(b"\n")
            position += len(chunk)
    return breaks + 1


def _where(file: Path, offset: int) -> str:
    return f"{file}, line {_line_number(file, offset)} (byte {offset})"


def json_row(line: bytes, file: Path, offset: int) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GQAConvertError(f"{_where(file, offset)} is not a JSON object ({error})") from None
    except RecursionError:
        raise GQAConvertError(f"{_where(file, offset)} is nested too deeply to be a row") from None
    if not isinstance(row, dict):
        raise GQAConvertError(f"{_where(file, offset)} is not a JSON object")
    return row


def row_text(line: bytes, file: Path, offset: int, text_column: str) -> str | None:
    """The text of the row on `line` (None: an empty document)."""
    row = json_row(line, file, offset)
    if text_column not in row:
        raise GQAConvertError(f"{file} has no column '{text_column}' (columns: {', '.join(row)}): pass --text-column")
    return document_text(row[text_column], text_column, lambda: _where(file, offset))


def check_first_row(file: Path, text_column: str) -> None:
    """The first row of a .jsonl file must hold the text column, as text: checked before any work."""
    with open(file, "rb") as handle:
        offset = 0
        for line in handle:
            if line.strip():
                row_text(line, file, offset, text_column)
                return
            offset += len(line)


def jsonl_texts(file: Path, start: int, end: int, text_column: str) -> Iterator[str]:
    """The texts of the rows in bytes [start, end) (whole lines)."""
    with open(file, "rb") as handle:
        handle.seek(start)
        data = handle.read(end - start)
    if len(data) != end - start:
        raise changed_error(file)
    offset = start
    for line in data.split(b"\n"):
        if line.strip():
            text = row_text(line, file, offset, text_column)
            if text is not None:
                yield text
        offset += len(line) + 1
