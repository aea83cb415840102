"""A token folder's manifest.json (totals, dtype, EOS, tokenizer identity, shards, source, tool
version), and the tokenizer identity that decides whether a folder fits a model.

The identity is a fingerprint of everything that decides the ids of a text: the fast tokenizer's
serialized pipeline (normalizer, pre-tokenizer, model, added tokens; not its padding or truncation
settings) and the special token ids. Two copies of one tokenizer share it; any other tokenizer does not.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gqa_convert import __version__
from gqa_convert.errors import GQAConvertError

MANIFEST = "manifest.json"
FORMAT = "gqa-convert-tokens"
FORMAT_VERSION = 1


def backend_json(tokenizer: Any) -> str:
    """The fast tokenizer's serialized pipeline, or an error when there is none."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or not getattr(tokenizer, "is_fast", False):
        raise GQAConvertError(
            f"the tokenizer {getattr(tokenizer, 'name_or_path', '')} has no fast (Rust) version: "
            "save it with a tokenizer.json (transformers converts most tokenizers when saving)"
        )
    return backend.to_str()


def tokenizer_identity(tokenizer: Any, serialized: str | None = None) -> dict[str, Any]:
    """fingerprint (shared by copies of one tokenizer), name_or_path (for people), sizes and EOS."""
    pipeline = json.loads(serialized or backend_json(tokenizer))
    for setting in ("padding", "truncation", "version"):
        pipeline.pop(setting, None)
    specials = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    text = json.dumps({"pipeline": pipeline, "specials": specials}, sort_keys=True)
    return {
        "fingerprint": hashlib.sha256(text.encode()).hexdigest(),
        "name_or_path": str(getattr(tokenizer, "name_or_path", "")),
        "vocab_size": len(tokenizer),
        "eos_token_id": tokenizer.eos_token_id,
    }


def token_dtype(tokenizer: Any) -> np.dtype:
    """uint16 when every id fits, else uint32."""
    largest = max(max(tokenizer.get_vocab().values(), default=0), len(tokenizer) - 1)
    return np.dtype(np.uint16 if largest <= np.iinfo(np.uint16).max else np.uint32)


@dataclass(frozen=True)
class TokenizerInfo:
    """A tokenizer with what tokenization needs of it, computed once: identity, JSON, id dtype."""

    tokenizer: Any
    identity: dict[str, Any]
    serialized: str
    dtype: np.dtype


def tokenizer_info(tokenizer: Any) -> TokenizerInfo:
    serialized = backend_json(tokenizer)
    identity = tokenizer_identity(tokenizer, serialized)
    if identity["eos_token_id"] is None:
        raise GQAConvertError("the tokenizer has no EOS token to separate documents")
    return TokenizerInfo(tokenizer, identity, serialized, token_dtype(tokenizer))


def build_manifest(
    shards: list[dict[str, Any]], tokenizer: dict[str, Any], dtype: str, source: dict[str, Any], **extra: Any
) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "tokens": sum(shard["tokens"] for shard in shards),
        "documents": sum(shard["documents"] for shard in shards),
        "dtype": dtype,
        "eos_token_id": tokenizer["eos_token_id"],
        "tokenizer": tokenizer,
        "shards": shards,
        "source": source,
        **extra,
    }


def write_json_atomic(path: Path, value: Any) -> None:
    """Written under a temporary name and renamed: a reader sees the whole file or none."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(value, indent=1))
    partial.replace(path)


def is_token_folder(data: str | Path) -> bool:
    """A folder written by `gqa-convert tokenize` (it holds a manifest.json of this format)."""
    path = Path(data) / MANIFEST
    if not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == FORMAT
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        return False


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a token folder, checked against the shards it lists."""
    folder = Path(folder)
    if not is_token_folder(folder):
        raise GQAConvertError(f"{folder} is not a token folder (no {MANIFEST}): make one with gqa-convert tokenize")
    manifest = json.loads((folder / MANIFEST).read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise GQAConvertError(
            f"{folder} was written in token format {manifest.get('format_version')} (this version reads "
            f"{FORMAT_VERSION}): tokenize the data again"
        )
    itemsize = np.dtype(manifest["dtype"]).itemsize
    for shard in manifest["shards"]:
        file = folder / shard["file"]
        if not file.is_file() or file.stat().st_size != shard["tokens"] * itemsize:
            raise GQAConvertError(f"{file} is missing or not the size its manifest says: tokenize the data again")
    return manifest


def check_tokenizer(manifest: dict[str, Any], tokenizer: Any, data: str, model: str) -> None:
    """Refuse token data made with another tokenizer than the model's (one line naming both)."""
    theirs, ours = manifest["tokenizer"], tokenizer_identity(tokenizer)
    if theirs["fingerprint"] != ours["fingerprint"]:
        raise GQAConvertError(
            f"{data} was tokenized with {theirs['name_or_path']} (tokenizer {theirs['fingerprint'][:12]}) but "
            f"{model} uses {ours['name_or_path']} ({ours['fingerprint'][:12]}): "
            f"tokenize the data again with --tokenizer {model}"
        )
