"""The files that travel with the weights: config.json, tokenizer and generation settings."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from gqa_convert.io.portable import make_tokenizer_portable
from gqa_convert.io.provenance import PROVENANCE_FILE
from gqa_convert.io.sources import WEIGHT_SUFFIXES, Checkpoint
from gqa_convert.io.writer import INDEX_NAME

_OWN_FILES = {"config.json", "README.md", PROVENANCE_FILE, INDEX_NAME}


def write_config(folder: Path, config_dict: dict[str, Any]) -> None:
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")


def copy_side_files(checkpoint: Checkpoint, folder: Path) -> None:
    """The source's tokenizer and other non-weight files (for a GGUF: rebuilt from its metadata)."""
    if checkpoint.folder is not None:
        for path in sorted(checkpoint.folder.iterdir()):
            if (
                path.is_file()
                and path.name not in _OWN_FILES
                and not path.name.endswith(WEIGHT_SUFFIXES)
                and not path.name.endswith(".index.json")
            ):
                shutil.copy2(path, folder / path.name)
    if checkpoint.gguf_file is not None:
        from transformers import GenerationConfig

        checkpoint.tokenizer().save_pretrained(folder)
        GenerationConfig.from_model_config(checkpoint.config).save_pretrained(folder)
    make_tokenizer_portable(folder)
