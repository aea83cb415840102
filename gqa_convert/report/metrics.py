"""metrics.jsonl: the one schema of the records an uptraining run writes (gqa_convert.train.metrics),
and the one reader every command goes through (resume's trim, the run's summary and provenance, the
recovery curve). A line cut short by a crash, or edited into something else, is dropped and counted in
one warning, never a traceback; lines are read in bounded pieces whatever the file holds."""

from __future__ import annotations

import json
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gqa_convert.errors import GQAConvertError

METRICS_FILE = "metrics.jsonl"
MAX_LINE = 1 << 16  # bytes; a record is about 200, so a longer line is not one of ours
COUNTS = ("step", "tokens", "eval_tokens")  # whole numbers (step 0: the start, evaluated before training)
NUMBERS = ("loss", "lr", "tokens_per_s", "grad_norm", "distill_loss", "eval_perplexity", "source_perplexity")
POSITIVE = ("eval_perplexity", "source_perplexity")


def plain_record(record: dict[str, Any]) -> dict[str, Any]:
    """A record as written: numbers that are not finite (a diverged step) become null, so the file
    stays standard JSON and passes its own schema."""
    return {
        key: None if isinstance(value, float) and not math.isfinite(value) else value for key, value in record.items()
    }


def check_record(record: Any) -> str | None:
    """What is wrong with a parsed line, or None for a record this tool writes."""
    if not isinstance(record, dict):
        return "not a JSON object"
    for name in COUNTS:
        value = record.get(name, 0 if name == "eval_tokens" else None)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{name} is not a count"
    for name in NUMBERS:
        value = record.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return f"{name} is not a finite number"
        if name in POSITIVE and value <= 0:
            return f"{name} is not positive"
    if record["step"] > 0 and "loss" not in record:
        return "a training step without its loss"
    return None


def _lines(path: Path) -> Iterator[bytes | None]:
    """The file's lines, None for a line too long to be a record (skipped in bounded pieces)."""
    with open(path, "rb") as handle:
        while line := handle.readline(MAX_LINE + 1):
            if len(line) > MAX_LINE and not line.endswith(b"\n"):
                while (rest := handle.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                    pass
                yield None
            else:
                yield line


def _parse(line: bytes | None) -> dict[str, Any] | str:
    if line is None:
        return f"longer than {MAX_LINE:,} bytes"
    try:
        record = json.loads(line)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return "not JSON"
    return check_record(record) or record


def read_records(path: Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl in file order ([] without the file); lines that are not records
    are dropped with one warning naming the first."""
    records: list[dict[str, Any]] = []
    dropped: list[str] = []
    if not path.is_file():
        return records
    try:
        for number, line in enumerate(_lines(path), start=1):
            if line is not None and not line.strip():
                continue
            parsed = _parse(line)
            if isinstance(parsed, str):
                dropped.append(f"line {number}: {parsed}")
            else:
                records.append(parsed)
    except OSError as error:
        raise GQAConvertError(f"cannot read {path}: {error.strerror or error}") from None
    if dropped:
        more = f" and {len(dropped) - 1} more" if len(dropped) > 1 else ""
        warnings.warn(f"{path.name}: dropped {len(dropped)} unreadable line(s) ({dropped[0]}{more})", stacklevel=2)
    return records


def last_trained(records: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last record of a training step (step 0 is the evaluation before training), or None."""
    return next((record for record in reversed(records) if record["step"] > 0), None)


@dataclass(frozen=True, slots=True)
class MetricsRow:
    """What the recovery curve draws of one record."""

    step: int  # optimizer steps done (0: the evaluation before training)
    tokens: int  # tokens trained on, all processes
    loss: float | None = None  # training LM loss of the step (None at step 0, or where it was not finite)
    distill_loss: float | None = None
    eval_perplexity: float | None = None  # held-out perplexity after the step
    source_perplexity: float | None = None  # the source model's, on the same held-out tokens (step 0)


def read_rows(path: Path) -> list[MetricsRow]:
    """The rows of an uptrain run's metrics.jsonl, by step (a resumed run's later rows replace earlier
    rows of the same step)."""
    if not path.is_file():
        raise GQAConvertError(f"{path} not found: give the output folder of an uptrain run")
    rows: dict[int, MetricsRow] = {}
    for record in read_records(path):
        values = {name: record.get(name) for name in MetricsRow.__slots__}
        rows[record["step"]] = MetricsRow(**values)
    return [rows[step] for step in sorted(rows)]
