"""metrics.jsonl read back, schema-checked: one JSON object per line with the fields an uptraining run
writes. A line cut short by a crash, or edited into something else, is dropped and counted in one
warning; a resumed run's later rows replace earlier rows of the same step."""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from gqa_convert.errors import GQAConvertError

METRICS_FILE = "metrics.jsonl"
MAX_LINE = 1 << 20  # bytes; a metrics row is about 200


@dataclass(frozen=True, slots=True)
class MetricsRow:
    step: int  # optimizer steps done (0: the evaluation before training)
    tokens: int  # tokens trained on, all processes
    loss: float | None = None  # training LM loss of the step (None at step 0)
    distill_loss: float | None = None
    eval_perplexity: float | None = None  # held-out perplexity after the step
    source_perplexity: float | None = None  # the source model's, on the same held-out tokens (step 0)


_COUNTS = ("step", "tokens")
_VALUES = ("loss", "distill_loss", "eval_perplexity", "source_perplexity")
_POSITIVE = ("eval_perplexity", "source_perplexity")


def parse_row(line: bytes) -> MetricsRow | str:
    """The row of one line, or what is wrong with it."""
    try:
        record = json.loads(line)
    except (ValueError, UnicodeDecodeError):
        return "not JSON"
    if not isinstance(record, dict):
        return "not a JSON object"
    values = {}
    for name in _COUNTS:
        value = record.get(name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            return f"{name} is not a count"
        values[name] = value
    for name in _VALUES:
        value = record.get(name)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            return f"{name} is not a finite number"
        if name in _POSITIVE and value <= 0:
            return f"{name} is not positive"
        values[name] = float(value)
    if values["step"] > 0 and "loss" not in values:
        return "a training step without its loss"
    return MetricsRow(**values)


def read_rows(path: Path) -> list[MetricsRow]:
    """The rows of a metrics.jsonl, by step; bad lines dropped with one warning."""
    if not path.is_file():
        raise GQAConvertError(f"{path} not found: give the output folder of an uptrain run")
    rows: dict[int, MetricsRow] = {}
    dropped: list[str] = []
    try:
        with open(path, "rb") as handle:
            number = 0
            while line := handle.readline(MAX_LINE):
                number += 1
                if len(line) == MAX_LINE and not line.endswith(b"\n"):
                    while (rest := handle.readline(MAX_LINE)) and not rest.endswith(b"\n"):
                        pass  # skip the rest of an overlong line
                    dropped.append(f"line {number}: longer than {MAX_LINE:,} bytes")
                    continue
                if not line.strip():
                    continue
                row = parse_row(line)
                if isinstance(row, str):
                    dropped.append(f"line {number}: {row}")
                else:
                    rows[row.step] = row
    except OSError as error:
        raise GQAConvertError(f"cannot read {path}: {error.strerror or error}") from None
    if dropped:
        more = f" and {len(dropped) - 1} more" if len(dropped) > 1 else ""
        warnings.warn(f"{path.name}: dropped {len(dropped)} unreadable line(s) ({dropped[0]}{more})", stacklevel=2)
    return [rows[step] for step in sorted(rows)]
