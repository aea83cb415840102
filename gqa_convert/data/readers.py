"""The documents of a work unit, as (text, ends_document) pieces in order, read with bounded memory:
a text range in the pieces data.cuts gives, and a row's text longer than LONG_TEXT_CHARS cut the same
way (EOS after its last piece only), so no tokenizer call ever sees more than a few tens of KiB.

A local file is checked against the size and mtime it had when the unit was planned, before and
after it is read: a file truncated, rewritten or replaced meanwhile is refused with one line."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

from gqa_convert.data.cuts import BOUND, LOOKBACK, file_window, piece_cuts, text_cuts
from gqa_convert.data.files import changed_error
from gqa_convert.data.jsonl import jsonl_texts
from gqa_convert.data.text import column_texts, document_text, load_hub, load_table, not_utf8
from gqa_convert.data.units import Columns, WorkUnit

LONG_TEXT_CHARS = 1 << 16
Pieces = Iterator[tuple[str, bool]]


def check_unchanged(unit: WorkUnit) -> None:
    if unit.size < 0:
        return
    try:
        status = os.stat(unit.source)
    except FileNotFoundError:
        raise changed_error(unit.source) from None
    if (status.st_size, status.st_mtime_ns) != (unit.size, unit.mtime_ns):
        raise changed_error(unit.source)


def unit_documents(unit: WorkUnit, columns: Columns) -> Pieces:
    """(text, ends_document) pieces of a unit, in order."""
    check_unchanged(unit)
    yield from _READERS[unit.kind](unit, columns)
    check_unchanged(unit)


def row_pieces(text: str) -> Pieces:
    """One document's text: whole, or cut into pieces when it is long."""
    if len(text) <= LONG_TEXT_CHARS:
        yield text, True
        return
    data = text.encode("utf-8")
    bounds = [0, *text_cuts(data), len(data)]
    for first, last in zip(bounds, bounds[1:]):
        yield data[first:last].decode("utf-8"), last == len(data)


def _rows(texts: Iterator[str]) -> Pieces:
    for text in texts:
        yield from row_pieces(text)


def _text_range(unit: WorkUnit, columns: Columns) -> Pieces:
    file, start, end = Path(unit.source), unit.start, unit.end
    with open(file, "rb") as handle:
        window = file_window(handle, unit.size, start, end)
    if len(window.data) != min(unit.size, end + BOUND + 2) - max(0, start - LOOKBACK - 2):
        raise changed_error(file)
    bounds = [start, *piece_cuts(window, start, end), end]
    for first, last in zip(bounds, bounds[1:]):
        try:
            text = window.data[first - window.base : last - window.base].decode("utf-8")
        except UnicodeDecodeError as error:
            raise not_utf8(file, first + error.start) from None
        yield text, unit.ends_document and last == end


def _jsonl(unit: WorkUnit, columns: Columns) -> Pieces:
    return _rows(jsonl_texts(Path(unit.source), unit.start, unit.end, columns.text_column))


def _parquet_texts(unit: WorkUnit, columns: Columns) -> Iterator[str]:
    import pyarrow.parquet as pq

    parquet = pq.ParquetFile(unit.source)
    row = sum(parquet.metadata.row_group(group).num_rows for group in range(unit.start))
    groups = list(range(unit.start, unit.end))
    for batch in parquet.iter_batches(row_groups=groups, columns=[columns.text_column]):
        for value in batch.column(0).to_pylist():
            row += 1
            text = document_text(value, columns.text_column, f"{unit.source}, row {row}")
            if text is not None:
                yield text


def _parquet(unit: WorkUnit, columns: Columns) -> Pieces:
    return _rows(_parquet_texts(unit, columns))


def _table(unit: WorkUnit, columns: Columns) -> Pieces:
    return _rows(column_texts(load_table(Path(unit.source)), columns.text_column, unit.source))


def _hub(unit: WorkUnit, columns: Columns) -> Pieces:
    rows = load_hub(unit.source, columns.data_config, columns.split).shard(num_shards=unit.end, index=unit.start)
    return _rows(column_texts(rows, columns.text_column, f"{unit.source} (shard {unit.start + 1} of {unit.end})"))


_READERS: dict[str, Callable[[WorkUnit, Columns], Pieces]] = {
    "text": _text_range,
    "jsonl": _jsonl,
    "parquet": _parquet,
    "table": _table,
    "hub": _hub,
}
