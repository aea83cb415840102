"""What was done to a model, written beside its weights: gqa_convert.json (tool version, source,
method, groups, date; uptraining adds its own record) and a Hub-style model card."""

from __future__ import annotations

import datetime as dt
import json
from pathlib import Path
from typing import Any

from gqa_convert import __version__

PROVENANCE_FILE = "gqa_convert.json"


def new_record(source: str, details: dict[str, Any]) -> dict[str, Any]:
    import torch

    return {
        "tool": "gqa-convert",
        "version": __version__,
        "source": source,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        **details,
    }


def read_record(folder: Path) -> dict[str, Any] | None:
    """The provenance of a folder this tool wrote, or None."""
    path = folder / PROVENANCE_FILE
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):  # unreadable, not JSON, or nested past any record
        return None
    return record if isinstance(record, dict) else None


def write_record(folder: Path, record: dict[str, Any]) -> None:
    (folder / PROVENANCE_FILE).write_text(json.dumps(record, indent=2) + "\n")


def write_model_card(folder: Path, source: str, details: dict[str, Any], before: int, after: int, title: str) -> None:
    """A Hub-style README.md: YAML front matter, then what was done and what it saves."""
    base = source if not Path(source).exists() else Path(source).name
    operation = details["operation"]
    if operation == "pool":
        what = (
            f"The {details['kv_heads_before']} kv heads were merged into {details['kv_heads_after']} by the "
            f"recipe `{details['recipe']['name']}` (method `{details['method']}` over `{details['grouping']}` "
            f"groups {details['groups']})."
        )
        advice = (
            "Merging kv heads of a trained model loses quality until the model is uptrained "
            "(`gqa-convert uptrain`); measure it with `gqa-convert eval`."
        )
    else:
        what = f"Each of the {details['kv_heads_before']} kv heads was copied to the query heads that read it."
        advice = "This conversion is exact: the model computes the same function as its source."
    card = f"""---
base_model: {base}
library_name: transformers
tags:
- gqa-convert
- grouped-query-attention
- {operation}
---

# {title}

Converted from `{base}` by gqa-convert {__version__} (`{operation}`).

{what}

| | kv heads | KV cache per token (bf16) |
|---|---|---|
| source | {details["kv_heads_before"]} | {before} bytes |
| this model | {details["kv_heads_after"]} | {after} bytes ({after / before - 1:+.1%}) |

{advice}

Provenance (tool version, method, groups, date) is in `{PROVENANCE_FILE}`.
"""
    (folder / "README.md").write_text(card)
