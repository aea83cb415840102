"""Parsing and printing of quantities users type: byte sizes (5GB), token counts (2B), dtypes."""

from __future__ import annotations

import re

from gqa_convert.errors import GQAConvertError

_BYTE_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
_TOKEN_SUFFIXES = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "G": 10**9, "T": 10**12}

# Output dtypes of floating tensors; "auto" keeps each tensor's own.
DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count: a positive whole number of bytes."""
    cleaned = str(text).strip().upper().replace(" ", "")
    match = re.fullmatch(r"([0-9]*\.?[0-9]+)(" + "|".join(_BYTE_UNITS) + r"|B)?", cleaned)
    if not match:
        raise GQAConvertError(f"size '{text}' is not understood: write e.g. 5GB, 500MB or 2GiB")
    size = int(float(match.group(1)) * _BYTE_UNITS.get(match.group(2) or "B", 1))
    if size < 1:
        raise GQAConvertError(f"size '{text}' is less than one byte: write e.g. 5GB, 500MB or 2GiB")
    return size


def parse_tokens(text: str | int) -> int:
    """'50M', '2B', '1.5T', '300000' -> an integer count."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMBGT]?)\s*", str(text).upper())
    if not match:
        raise GQAConvertError(f"token count '{text}' is not understood: write e.g. 50M, 2B or 300000")
    return int(float(match.group(1)) * _TOKEN_SUFFIXES[match.group(2)])


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def torch_dtype(name: str):  # -> torch.dtype | None
    """The torch dtype of a DTYPE_NAMES entry (None for auto); an unknown name names the choices."""
    if name not in DTYPE_NAMES:
        raise GQAConvertError(f"unknown dtype '{name}'; choose one of: {', '.join(DTYPE_NAMES)}")
    import torch

    return None if name == "auto" else getattr(torch, name)
