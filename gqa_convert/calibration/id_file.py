"""Calibration token ids as a file: what a conversion calibrated on, kept for people to read and reuse.

`NAME.safetensors` holds one tensor, `input_ids` (sequences, tokens; int32), and in its metadata the
format, the vocabulary size it was written for and how the ids were made (JSON text); `NAME.txt` holds
the same sequences decoded, for people. Giving the .safetensors file as calibration data calibrates on
exactly these ids (text would be tokenized again, and sampled ids do not always survive decoding and
encoding unchanged).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from gqa_convert.errors import GQAConvertError
from gqa_convert.io.safetensors_format import read_safetensors_header

FORMAT = "gqa-convert calibration ids"
FORMAT_VERSION = "1"
TENSOR = "input_ids"
SUFFIX = ".safetensors"


REWRITE = "give the file a conversion kept in OUT/calibration/, or run that conversion again"


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A digest of the tokenizer's vocabulary (every token and its id): ids mean the same text only
    under the same one."""
    vocabulary = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256(vocabulary.encode("utf-8")).hexdigest()[:16]


def is_id_file(data: str | Path) -> bool:
    """A calibration source given as a token-ids file (rather than text, a table or a dataset id)."""
    return str(data).endswith(SUFFIX) and Path(data).is_file()


def write_id_file(folder: Path, name: str, ids: torch.Tensor, tokenizer: Any, made_by: dict[str, Any]) -> Path:
    """Write NAME.safetensors (the ids) and NAME.txt (decoded) into `folder`; returns the .safetensors path."""
    if ids.dim() != 2 or ids.dtype.is_floating_point or ids.numel() == 0:
        raise GQAConvertError("calibration ids must be a non-empty (sequences, tokens) integer tensor")
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "vocab_size": str(len(tokenizer)),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "made_by": json.dumps(made_by, sort_keys=True),
    }
    path = folder / f"{name}{SUFFIX}"
    data = ids.to(torch.int32).numpy().astype("<i4").tobytes()
    header = {
        "__metadata__": metadata,
        TENSOR: {"dtype": "I32", "shape": list(ids.shape), "data_offsets": [0, len(data)]},
    }
    encoded = json.dumps(header, sort_keys=True, separators=(",", ":")).encode()  # the same bytes for the same ids
    encoded += b" " * (-len(encoded) % 8)  # the format aligns data to 8 bytes
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)
    rows = len(ids)
    text = "".join(
        f"----- sequence {row + 1} of {rows} -----\n{tokenizer.decode(ids[row].tolist())}\n\n" for row in range(rows)
    )
    (folder / f"{name}.txt").write_text(text, encoding="utf-8")
    return path


def read_id_file(
    path: str | Path, vocab_size: int, tokenizer: Any | None = None, max_tokens: int | None = None
) -> torch.Tensor:
    """The (sequences, tokens) int64 ids of a file write_id_file wrote, checked: its format, one 2-D
    integer tensor, every id below `vocab_size` (the model's) and not negative, and, where the model's
    `tokenizer` is given, written for that tokenizer. With `max_tokens`, only the sequences that hold
    them are read."""
    path = Path(path)
    try:
        infos = read_safetensors_header(path)
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            if metadata.get("format") != FORMAT or [info.name for info in infos] != [TENSOR]:
                raise GQAConvertError(
                    f"{path} is not a calibration ids file (one '{TENSOR}' tensor, format '{FORMAT}'): "
                    "pass text, or the .safetensors file a conversion wrote beside its calibration text"
                )
            if metadata.get("format_version") != FORMAT_VERSION:
                raise GQAConvertError(
                    f"{path} is calibration ids format {metadata.get('format_version')!r}; this version reads "
                    f"{FORMAT_VERSION}: write it again"
                )
            info = infos[0]
            if len(info.shape) != 2 or info.dtype not in (torch.int32, torch.int64) or min(info.shape) < 1:
                raise GQAConvertError(
                    f"{path}: '{TENSOR}' must be a 2-D int32/int64 tensor, not {info.dtype} {info.shape}"
                )
            if tokenizer is not None:
                _check_tokenizer(path, metadata, tokenizer)
            rows = info.shape[0] if max_tokens is None else min(info.shape[0], -(-max_tokens // info.shape[1]))
            ids = handle.get_slice(TENSOR)[:rows].long()
    except OSError as error:
        raise GQAConvertError(f"{path} could not be read ({os.strerror(error.errno or 0) or error})") from None
    except GQAConvertError as error:
        message = str(error)  # the safetensors checks' fix is for downloaded weights
        if message.endswith("re-download it"):
            raise GQAConvertError(message.removesuffix("re-download it") + REWRITE) from None
        raise
    except Exception as error:  # safetensors raises its own types for corrupt files
        raise GQAConvertError(f"{path} is not a readable safetensors file ({error}): {REWRITE}") from None
    if int(ids.min()) < 0 or int(ids.max()) >= vocab_size:
        raise GQAConvertError(
            f"{path} holds token ids outside the model's vocabulary (0 .. {vocab_size - 1}): it was written "
            "for another tokenizer; calibrate on text instead"
        )
    return ids


def _check_tokenizer(path: Path, metadata: dict[str, str], tokenizer: Any) -> None:
    """The file was written for this tokenizer: the same number of tokens and, where the file names
    it, the same vocabulary."""
    written, fingerprint = metadata.get("vocab_size"), metadata.get("tokenizer")
    if written != str(len(tokenizer)) or (fingerprint is not None and fingerprint != tokenizer_fingerprint(tokenizer)):
        size = f" of {written} tokens" if written != str(len(tokenizer)) else ""
        raise GQAConvertError(
            f"{path} was written for another tokenizer{size} than the model's ({len(tokenizer)} tokens): its ids "
            "would mean other text; calibrate on text instead, or on the ids a conversion of this model kept"
        )
