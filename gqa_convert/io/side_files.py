"""The files that travel with the weights: config.json (rewritten) and, from the source folder, an
allow-list of tokenizer, chat template, generation config and license files. Only regular files are
copied, never through a symlink that leaves the source, never hidden files (.env and the like hold
secrets); what is left behind is named in one warning."""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import stat
import warnings
from pathlib import Path
from typing import Any

from gqa_convert.io.names import SIDE_FILES
from gqa_convert.io.portable import make_tokenizer_portable
from gqa_convert.io.provenance import PROVENANCE_FILE
from gqa_convert.io.sources import Checkpoint
from gqa_convert.io.weight_files import INDEXES

# Written here (config, model card, provenance) or converted (weights, index): not side files.
_WRITTEN = {"config.json", "README.md", PROVENANCE_FILE, *(index for index, _ in INDEXES)}
_LISTED = 8


def write_config(folder: Path, config_dict: dict[str, Any]) -> None:
    (folder / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")


def copy_side_files(checkpoint: Checkpoint, folder: Path) -> None:
    """Copy the source's side files into `folder` (for a GGUF: rebuilt from its metadata), in a form
    every client reads; warn once about the files left behind."""
    if checkpoint.gguf_file is not None:
        from transformers import GenerationConfig

        checkpoint.tokenizer().save_pretrained(folder)
        GenerationConfig.from_model_config(checkpoint.config).save_pretrained(folder)
    else:
        _copy_allowed(checkpoint, folder)
    make_tokenizer_portable(folder)


def _copy_allowed(checkpoint: Checkpoint, folder: Path) -> None:
    """The allow-listed regular files of a source folder, content only."""
    assert checkpoint.folder is not None
    weights = {Path(info.file).name for info in checkpoint.tensors.values()}
    skipped = []
    for path in sorted(checkpoint.folder.iterdir()):
        if path.name in _WRITTEN or path.name in weights:
            continue
        target, reason = side_file_target(path, checkpoint.folder)
        if target is None:
            skipped.append(f"{path.name} ({reason})" if reason else path.name)
            continue
        shutil.copyfile(target, folder / path.name)  # content only: modes follow the umask
    if skipped:
        shown = ", ".join(skipped[:_LISTED]) + (f" and {len(skipped) - _LISTED} more" if len(skipped) > _LISTED else "")
        warnings.warn(
            f"not copied from {checkpoint.folder} (only tokenizer, chat template, generation config and license "
            f"files travel): {shown}",
            stacklevel=3,
        )


def side_file_target(path: Path, source: Path) -> tuple[Path | None, str]:
    """The regular file to copy for `path`, or None and why not ("" when it is simply not on the list)."""
    if path.name.startswith("."):
        return None, "hidden"
    if not any(fnmatch.fnmatchcase(path.name, pattern) for pattern in SIDE_FILES):
        return None, "folder" if path.is_dir() and not path.is_symlink() else ""
    try:
        target = path.resolve(strict=True)
    except (OSError, RuntimeError):  # a dangling link or a loop
        return None, "broken link"
    if path.is_symlink() and not any(root == target.parent or root in target.parents for root in _roots(source)):
        return None, "link leading outside the source"
    if not stat.S_ISREG(os.stat(target).st_mode):
        return None, "not a regular file"
    return target, ""


def _roots(source: Path) -> list[Path]:
    """Where the source's links may lead: the folder, and the blob store of a Hugging Face cache snapshot."""
    folder = source.resolve()
    roots = [folder]
    if folder.parent.name == "snapshots" and (folder.parent.parent / "blobs").is_dir():
        roots.append((folder.parent.parent / "blobs").resolve())
    return roots
