"""The local tasks' data, for lm-eval (`custom_dataset: !function loader.load_splits` in each YAML):
the JSON-lines files beside this module, so the tasks run from any working directory with no download.
Standalone (datasets only), so this folder also works as `lm_eval --include_path FOLDER`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

SPLITS = ("test", "fewshot")


def load_splits(task_data: str, **_metadata: Any) -> dict[str, Any]:
    """{split: datasets.Dataset} from TASK_DATA.SPLIT.jsonl (lm-eval also passes the task's metadata)."""
    import datasets

    folder = Path(__file__).resolve().parent
    splits = {}
    for split in SPLITS:
        lines = (folder / f"{task_data}.{split}.jsonl").read_text(encoding="utf-8").splitlines()
        splits[split] = datasets.Dataset.from_list([json.loads(line) for line in lines if line.strip()])
    return splits
