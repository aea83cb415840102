"""The safetensors format: header parsing with every check done before any work (truncation,
corrupt JSON, offsets outside the file), tensor sizes, and a kernel-side byte copy of one tensor."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import torch

from gqa_convert.errors import GQAConvertError, is_disk_full

SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 << 20


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str  # the shard it lives in ("" for in-memory sources)
    begin: int = 0  # absolute byte offsets in the file (safetensors only)
    end: int = 0

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.shape, self.dtype)


def tensor_bytes(shape: tuple[int, ...], dtype: torch.dtype) -> int:
    numel = 1
    for size in shape:
        numel *= size
    return numel * dtype.itemsize


def read_safetensors_header(path: Path) -> list[TensorInfo]:
    """Parse and check a safetensors header as the safetensors library does (no tensor data is read):
    a JSON object of entries whose data lie end to end and fill the file exactly. Sorted by offset."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw_length = handle.read(8)
        if len(raw_length) < 8:
            raise GQAConvertError(f"{path} is not a safetensors file (too short); re-download it")
        (header_length,) = struct.unpack("<Q", raw_length)
        if header_length > min(size - 8, MAX_HEADER_BYTES):
            raise GQAConvertError(f"{path} has a corrupt header (length {header_length}); re-download it")
        header = _parse_header(handle.read(header_length), path)
    data_start = 8 + header_length
    infos = [_tensor_info(name, entry, path, data_start) for name, entry in header.items() if name != "__metadata__"]
    infos.sort(key=lambda info: (info.begin, info.end))
    position = data_start
    for info in infos:
        if info.begin != position:
            what = "overlaps the previous one" if info.begin < position else "leaves a gap before it"
            raise GQAConvertError(f"{path} is corrupt (the data of tensor '{info.name}' {what}); re-download it")
        position = info.end
    if position != size:
        raise GQAConvertError(
            f"{path} is truncated or corrupt ({size - data_start} data bytes, the header describes "
            f"{position - data_start}); re-download it"
        )
    return infos


def _parse_header(raw: bytes, path: Path) -> dict[str, Any]:
    try:
        header = json.loads(raw, object_pairs_hook=_unique_keys)
    except (UnicodeDecodeError, ValueError, RecursionError):  # JSONDecodeError is a ValueError
        header = None
    if not isinstance(header, dict):
        raise GQAConvertError(f"{path} has a corrupt header (not a JSON object, or a name twice); re-download it")
    metadata = header.get("__metadata__")
    if metadata is not None and not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise GQAConvertError(f"{path} has a corrupt header (__metadata__ is not text); re-download it")
    return header


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object whose names are unique (the safetensors library would keep the last silently)."""
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("a name appears twice")
    return result


def _tensor_info(name: str, entry: Any, path: Path, data_start: int) -> TensorInfo:
    corrupt = f"{path}: tensor '{name}' has a corrupt header entry"
    if not isinstance(entry, dict) or not isinstance(entry.get("dtype"), str):
        raise GQAConvertError(f"{corrupt}; re-download it")
    if entry["dtype"] not in SAFETENSORS_DTYPES:
        raise GQAConvertError(
            f"{path}: tensor '{name}' has dtype {entry['dtype']}, which this tool does not handle "
            f"(it reads {', '.join(SAFETENSORS_DTYPES)})"
        )
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if not _counts(shape) or not _counts(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
        raise GQAConvertError(f"{corrupt} (shape or data offsets); re-download it")
    info = TensorInfo(
        name, tuple(shape), SAFETENSORS_DTYPES[entry["dtype"]], str(path), *(data_start + x for x in offsets)
    )
    if info.end - info.begin != info.nbytes:
        raise GQAConvertError(
            f"{corrupt} ({info.end - info.begin} bytes for a {list(shape)} {entry['dtype']} tensor); re-download it"
        )
    return info


def _counts(value: Any) -> bool:
    """A list of non-negative integers (JSON true/false and floats are not sizes)."""
    return isinstance(value, list) and all(isinstance(x, int) and not isinstance(x, bool) and x >= 0 for x in value)


def copy_range(src: BinaryIO, dst: BinaryIO, offset: int, length: int) -> None:
    """Copy `length` bytes at `offset` of src to the end of dst, in the kernel where it can."""
    dst.flush()
    try:  # kernel-side copy: no bytes pass through Python
        while length > 0:
            sent = os.copy_file_range(src.fileno(), dst.fileno(), length, offset_src=offset)
            if sent == 0:
                raise GQAConvertError(f"{src.name} ended early: the file is truncated")
            offset, length = offset + sent, length - sent
        return
    except (AttributeError, OSError) as error:
        if is_disk_full(error):
            raise
    src.seek(offset)
    while length > 0:
        chunk = src.read(min(length, 64 << 20))
        if not chunk:
            raise GQAConvertError(f"{src.name} ended early: the file is truncated")
        dst.write(chunk)
        length -= len(chunk)
