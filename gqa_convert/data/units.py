"""A corpus as work units that workers tokenize independently, and the documents of each unit.

One unit per file, except: a text file is cut into byte ranges (data.cuts; EOS only after the file's
last range), a .jsonl file into byte ranges of whole lines, a .parquet file into runs of row groups,
and a Hub dataset is one unit per shard of its stream. Units are listed in the order of the corpus
(files sorted, then by position), and the token stream is their concatenation in that order.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from gqa_convert.data.cuts import PIECE_BYTES, piece_cuts, text_ranges
from gqa_convert.data.text import column_texts, file_kind, load_hub, load_table, local_files, not_utf8
from gqa_convert.errors import GQAConvertError

MIN_UNIT_BYTES, MAX_UNIT_BYTES = 1 << 20, 64 << 20


@dataclass(frozen=True)
class WorkUnit:
    """One worker's share: `kind` says how to read it, start/end where (byte range, row groups, or
    shard index and shard count)."""

    index: int
    kind: str  # text | jsonl | parquet | table | hub
    source: str  # a file path or a Hub dataset id
    start: int = 0
    end: int = 0
    ends_document: bool = False  # text: this range ends the file, so EOS follows it


@dataclass(frozen=True)
class Columns:
    """Where the text is: the table column, and the Hub configuration and split."""

    text_column: str = "text"
    data_config: str | None = None
    split: str = "train"


def auto_unit_bytes(total_bytes: int) -> int:
    """About a thousand units for a large corpus (enough for any number of cores), never under 1 MiB
    nor over 64 MiB; a multiple of the piece size so every range boundary is a piece cut."""
    wanted = min(max(total_bytes // 1024, MIN_UNIT_BYTES), MAX_UNIT_BYTES)
    return -(-wanted // PIECE_BYTES) * PIECE_BYTES


def is_local(data: str) -> bool:
    return Path(data).exists()


def corpus_bytes(data: str) -> int:
    return sum(file.stat().st_size for file in local_files(Path(data))) if is_local(data) else 0


def source_signature(data: str, columns: Columns) -> dict[str, Any]:
    """What the corpus is: the resolved path (or the Hub id), the columns, and each file's path
    relative to it, size and mtime."""
    if not is_local(data):
        return {"data": str(data), **vars(columns)}
    root = Path(data).resolve()
    files = []
    for file in local_files(root):
        stat = file.stat()
        name = file.name if root.is_file() else str(file.relative_to(root))
        files.append({"path": name, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return {"data": str(root), **vars(columns), "files": files}


def corpus_identity(data: str, columns: Columns) -> dict[str, Any]:
    """What the tokens depend on, wherever the corpus is mounted: for local data the files' relative
    paths, sizes and mtimes (machines that mount a shared folder at different paths agree)."""
    signature = source_signature(data, columns)
    return {key: value for key, value in signature.items() if key != "data"} if is_local(data) else signature


def plan_units(data: str, columns: Columns, unit_bytes: int) -> list[WorkUnit]:
    """Every unit of the corpus, in order; the checks that need no tokenizer are done here."""
    if not is_local(data):
        rows = load_hub(data, columns.data_config, columns.split)
        shards = int(getattr(rows, "num_shards", None) or getattr(rows, "n_shards", 1))
        return [WorkUnit(i, "hub", data, i, shards) for i in range(shards)]
    spans: list[tuple[str, str, int, int, bool]] = []
    for file in local_files(Path(data)):
        spans += _file_spans(file, columns, unit_bytes)
    return [WorkUnit(i, *span) for i, span in enumerate(spans)]


def _file_spans(file: Path, columns: Columns, unit_bytes: int) -> list[tuple[str, str, int, int, bool]]:
    kind, size = file_kind(file), file.stat().st_size
    if kind == "text":
        with open(file, "rb") as handle:
            ranges = text_ranges(handle, size, unit_bytes)
        return [("text", str(file), start, end, end == size) for start, end in ranges]
    if file.suffix.lower() == ".jsonl":
        _check_first_row(file, columns.text_column)
        with open(file, "rb") as handle:
            return [("jsonl", str(file), start, end, True) for start, end in _line_ranges(handle, size, unit_bytes)]
    if kind == "parquet":
        return [("parquet", str(file), first, last, True) for first, last in _row_group_runs(file, columns, unit_bytes)]
    return [("table", str(file), 0, 0, True)]


def _line_ranges(handle: BinaryIO, size: int, unit_bytes: int) -> list[tuple[int, int]]:
    bounds = [0]
    for target in range(unit_bytes, size, unit_bytes):
        if target <= bounds[-1]:
            continue
        handle.seek(target - 1)
        handle.readline()  # to the end of the line holding byte target - 1
        bounds.append(handle.tell())
    bounds.append(size)
    bounds = sorted(set(bounds))
    return list(zip(bounds, bounds[1:]))


def _row_group_runs(file: Path, columns: Columns, unit_bytes: int) -> list[tuple[int, int]]:
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(file).metadata
    except Exception as error:  # pyarrow raises several types for unreadable files
        raise GQAConvertError(f"{file} could not be read as parquet: {error}") from None
    names = metadata.schema.names
    if columns.text_column not in names:
        raise GQAConvertError(
            f"{file} has no column '{columns.text_column}' (columns: {', '.join(names)}): pass --text-column"
        )
    runs, first, size = [], 0, 0
    for group in range(metadata.num_row_groups):
        size += metadata.row_group(group).total_byte_size
        if size >= unit_bytes or group == metadata.num_row_groups - 1:
            runs.append((first, group + 1))
            first, size = group + 1, 0
    return runs


def _check_first_row(file: Path, text_column: str) -> None:
    """The first row of a .jsonl file must hold the text column: checked before any work."""
    with open(file, "rb") as handle:
        offset = 0
        for line in handle:
            if line.strip():
                _row_text(json_row(line, file, offset), text_column, file)
                return
            offset += len(line)


def _lines(lines: list[bytes], start: int, file: Path) -> Iterator[tuple[int, bytes]]:
    offset = start
    for line in lines:
        if line.strip():
            yield offset, line
        offset += len(line) + 1


def json_row(line: bytes, file: Path, offset: int) -> dict[str, Any]:
    try:
        row = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise GQAConvertError(f"{file}: the line at byte {offset} is not a JSON object ({error})") from None
    if not isinstance(row, dict):
        raise GQAConvertError(f"{file}: the line at byte {offset} is not a JSON object")
    return row


def _row_text(row: dict[str, Any], text_column: str, file: Path) -> str | None:
    if text_column not in row:
        raise GQAConvertError(f"{file} has no column '{text_column}' (columns: {', '.join(row)}): pass --text-column")
    value = row[text_column]
    return str(value) if value else None


def unit_documents(unit: WorkUnit, columns: Columns) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces of a unit, in order."""
    if unit.kind == "text":
        yield from _text_range(Path(unit.source), unit.start, unit.end, unit.ends_document)
    elif unit.kind == "jsonl":
        yield from ((text, True) for text in _jsonl_range(Path(unit.source), unit.start, unit.end, columns))
    elif unit.kind == "parquet":
        yield from ((text, True) for text in _parquet_groups(Path(unit.source), unit.start, unit.end, columns))
    elif unit.kind == "table":
        rows = load_table(Path(unit.source))
        yield from ((text, True) for text in column_texts(rows, columns.text_column, unit.source))
    else:
        rows = load_hub(unit.source, columns.data_config, columns.split).shard(num_shards=unit.end, index=unit.start)
        yield from ((text, True) for text in column_texts(rows, columns.text_column, unit.source))


def _text_range(file: Path, start: int, end: int, ends_document: bool) -> Iterator[tuple[str, bool]]:
    with open(file, "rb") as handle:
        handle.seek(start)
        buffer = handle.read(end - start + 1)  # and the byte after the range, which decides the last cut
    bounds = [start, *piece_cuts(buffer, start, end), end]
    for first, last in zip(bounds, bounds[1:]):
        try:
            text = buffer[first - start : last - start].decode("utf-8")
        except UnicodeDecodeError as error:
            raise not_utf8(file, first + error.start) from None
        yield text, ends_document and last == end


def _jsonl_range(file: Path, start: int, end: int, columns: Columns) -> Iterator[str]:
    with open(file, "rb") as handle:
        handle.seek(start)
        lines = handle.read(end - start).split(b"\n")
    for offset, line in _lines(lines, start, file):
        text = _row_text(json_row(line, file, offset), columns.text_column, file)
        if text is not None:
            yield text


def _parquet_groups(file: Path, first: int, last: int, columns: Columns) -> Iterator[str]:
    import pyarrow.parquet as pq

    batches = pq.ParquetFile(file).iter_batches(row_groups=list(range(first, last)), columns=[columns.text_column])
    for batch in batches:
        for value in batch.column(0).to_pylist():
            if value:
                yield str(value)


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
