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
from gqa_convert.data.manifest_schema import check_manifest, damaged, plain_file
from gqa_convert.errors import GQAConvertError
from gqa_convert.io.vocabulary import check_ids_fit, largest_token_id

MANIFEST = "manifest.json"
FORMAT = "gqa-convert-tokens"
FORMAT_VERSION = 1
MAX_MANIFEST_BYTES = 256 << 20  # a manifest lists shards: a few MB for the largest corpora
_SCAN_TOKENS = 1 << 24


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
    largest = largest_token_id(tokenizer)
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
    """The manifest of shard records (file, tokens, documents and, from the workers, max_token_id)."""
    largest = [shard["max_token_id"] for shard in shards if shard.get("max_token_id", -1) >= 0]
    shards = [{key: shard[key] for key in ("file", "tokens", "documents")} for shard in shards]
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "tool_version": __version__,
        "tokens": sum(shard["tokens"] for shard in shards),
        "documents": sum(shard["documents"] for shard in shards),
        "dtype": dtype,
        "eos_token_id": tokenizer["eos_token_id"],
        "max_token_id": max(largest, default=None),
        "tokenizer": tokenizer,
        "shards": shards,
        "source": source,
        **extra,
    }


def write_json_atomic(path: Path, value: Any) -> None:
    """Written under a temporary name and renamed: a reader sees the whole file or none."""
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        partial.write_text(json.dumps(value, indent=1))
        partial.replace(path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise


def _read_json(folder: Path) -> Any:
    """manifest.json of a folder, parsed (one line saying what is wrong otherwise)."""
    path = plain_file(folder, MANIFEST, "the manifest")
    if path.stat().st_size > MAX_MANIFEST_BYTES:
        raise damaged(folder, f"{MANIFEST} is larger than any manifest ({path.stat().st_size} bytes)")
    try:
        return json.loads(path.read_bytes())
    except (ValueError, RecursionError) as error:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise damaged(folder, f"{MANIFEST} is not valid JSON: {str(error)[:80]}") from None
    except OSError as error:
        raise damaged(folder, f"{MANIFEST} cannot be read: {error.strerror}") from None


def is_token_folder(data: str | Path) -> bool:
    """A folder written by `gqa-convert tokenize`: its manifest.json says so, or shard files lie there
    beside a manifest.json that cannot be read or none (what is left of one: read_manifest says so)."""
    folder = Path(data)
    if not folder.is_dir():
        return False
    if not (folder / MANIFEST).exists():
        return _holds_shards(folder)
    try:
        manifest = _read_json(folder)
    except GQAConvertError:
        return _holds_shards(folder)
    return isinstance(manifest, dict) and manifest.get("format") == FORMAT


def _holds_shards(folder: Path) -> bool:
    try:
        return any(path.suffix == ".tokens" for path in folder.iterdir())
    except OSError:
        return False


def read_manifest(folder: str | Path) -> dict[str, Any]:
    """The manifest of a token folder, schema-checked against the folder (manifest_schema): every
    reader of a token folder goes through here."""
    folder = Path(folder)
    if not folder.is_dir() or not (folder / MANIFEST).exists():
        if folder.is_dir() and _holds_shards(folder):
            raise damaged(folder, f"{MANIFEST} is missing")
        raise GQAConvertError(f"{folder} is not a token folder (no {MANIFEST}): make one with gqa-convert tokenize")
    manifest = _read_json(folder)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise GQAConvertError(f"{folder} is not a token folder (its {MANIFEST} is not one gqa-convert tokenize wrote)")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise GQAConvertError(
            f"{folder} was written in token format {manifest.get('format_version')!r:.20} (this version reads "
            f"{FORMAT_VERSION}): tokenize the data again"
        )
    return check_manifest(manifest, folder)


def largest_id_in(folder: str | Path, manifest: dict[str, Any]) -> int:
    """The largest token id of a token folder: from its manifest, or (a folder written before the
    manifest recorded it) read from its shards, a bounded piece at a time."""
    if manifest.get("max_token_id") is not None:
        return manifest["max_token_id"]
    largest = -1
    for shard in manifest["shards"]:
        if shard["tokens"]:
            ids = np.memmap(Path(folder) / shard["file"], dtype=manifest["dtype"], mode="r")
            for start in range(0, len(ids), _SCAN_TOKENS):
                largest = max(largest, int(ids[start : start + _SCAN_TOKENS].max()))
            del ids
    return largest


def check_token_ids(folder: str | Path, manifest: dict[str, Any], vocab_size: int | None, model: object) -> None:
    """Refuse a token folder holding ids the model has no embedding for (before any forward pass)."""
    check_ids_fit(largest_id_in(folder, manifest), vocab_size, folder, model)


def check_tokenizer(manifest: dict[str, Any], tokenizer: Any, data: str, model: str) -> None:
    """Refuse token data made with another tokenizer than the model's (one line naming both)."""
    theirs, ours = manifest["tokenizer"], tokenizer_identity(tokenizer)
    if theirs["fingerprint"] != ours["fingerprint"]:
        raise GQAConvertError(
            f"{data} was tokenized with {theirs['name_or_path']} (tokenizer {theirs['fingerprint'][:12]}) but "
            f"{model} uses {ours['name_or_path']} ({ours['fingerprint'][:12]}): "
            f"tokenize the data again with --tokenizer {model}"
        )
