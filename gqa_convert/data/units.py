"""A corpus as work units that workers tokenize independently (data.readers reads their documents).

One unit per file, except: a text file is cut into byte ranges (data.cuts; EOS only after the file's
last range), a .jsonl file into byte ranges of whole lines, a .parquet file into runs of row groups,
and a Hub dataset is one unit per shard of its stream. Units are listed in the order of the corpus
(files sorted, then by position), and the token stream is their concatenation in that order. Each
unit of a local file carries the file's size and mtime when planned: a worker refuses a file that
changed since (truncated, rewritten or replaced while it is tokenized).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from gqa_convert.data.cuts import PIECE_BYTES, text_ranges
from gqa_convert.data.files import file_kind, local_files
from gqa_convert.data.jsonl import check_first_row
from gqa_convert.data.text import load_hub
from gqa_convert.errors import GQAConvertError

MIN_UNIT_BYTES, MAX_UNIT_BYTES = 1 << 20, 64 << 20
_SCAN_BYTES = 1 << 20  # a .jsonl file is searched for line ends this much at a time


@dataclass(frozen=True)
class WorkUnit:
    """One worker's share: `kind` says how to read it, start/end where (byte range, row groups, or
    shard index and shard count); size and mtime_ns those of the file when planned (-1: not a file)."""

    index: int
    kind: str  # text | jsonl | parquet | table | hub
    source: str  # a file path or a Hub dataset id
    start: int = 0
    end: int = 0
    ends_document: bool = False  # text: this range ends the file, so EOS follows it
    size: int = -1
    mtime_ns: int = -1


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
    units: list[WorkUnit] = []
    for file in local_files(Path(data)):
        try:
            units += _file_units(len(units), file, columns, unit_bytes)
        except OSError as error:
            raise GQAConvertError(f"cannot read {file} ({error.strerror}): make it readable") from None
    return units


def _file_units(first: int, file: Path, columns: Columns, unit_bytes: int) -> list[WorkUnit]:
    kind, stat = file_kind(file), file.stat()
    size, where = stat.st_size, {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    if kind == "text":
        with open(file, "rb") as handle:
            spans = [("text", start, end, end == size) for start, end in text_ranges(handle, size, unit_bytes)]
    elif file.suffix.lower() == ".jsonl":
        check_first_row(file, columns.text_column)
        with open(file, "rb") as handle:
            spans = [("jsonl", start, end, True) for start, end in _line_ranges(handle, size, unit_bytes)]
    elif kind == "parquet":
        spans = [("parquet", first, last, True) for first, last in _row_group_runs(file, columns, unit_bytes)]
    else:
        spans = [("table", 0, 0, True)]
    return [
        WorkUnit(first + i, unit_kind, str(file), start, end, ends, **where)
        for i, (unit_kind, start, end, ends) in enumerate(spans)
    ]


def _line_end(handle: BinaryIO, size: int, position: int) -> int:
    """The offset just past the line that holds byte position - 1 (read a bounded piece at a time)."""
    while position < size:
        handle.seek(position - 1)
        chunk = handle.read(_SCAN_BYTES)
        found = chunk.find(b"\n")
        if found >= 0:
            return position + found
        if not chunk:
            break
        position += len(chunk)
    return size


def _line_ranges(handle: BinaryIO, size: int, unit_bytes: int) -> list[tuple[int, int]]:
    bounds = [0]
    for target in range(unit_bytes, size, unit_bytes):
        if target > bounds[-1]:
            bounds.append(_line_end(handle, size, target))
    bounds.append(size)
    bounds = sorted(set(bound for bound in bounds if bound <= size))
    return list(zip(bounds, bounds[1:]))


def _row_group_runs(file: Path, columns: Columns, unit_bytes: int) -> list[tuple[int, int]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        metadata = pq.ParquetFile(file).metadata
    except OSError:
        raise
    except Exception as error:  # pyarrow raises several types for unreadable files
        raise GQAConvertError(f"{file} could not be read as parquet: {error}") from None
    schema = metadata.schema.to_arrow_schema()
    if columns.text_column not in schema.names:
        raise GQAConvertError(
            f"{file} has no column '{columns.text_column}' (columns: {', '.join(schema.names)}): pass --text-column"
        )
    kind = schema.field(columns.text_column).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_null(kind)):
        raise GQAConvertError(
            f"{file}: column '{columns.text_column}' holds {kind}, not text: pass --text-column with the column "
            "that holds the text"
        )
    runs, first, size = [], 0, 0
    for group in range(metadata.num_row_groups):
        size += metadata.row_group(group).total_byte_size
        if size >= unit_bytes or group == metadata.num_row_groups - 1:
            runs.append((first, group + 1))
            first, size = group + 1, 0
    return runs


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
