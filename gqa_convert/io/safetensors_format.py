"""The safetensors format: header parsing with every check done before any work (truncation,
corrupt JSON, offsets outside the file), tensor sizes, and a kernel-side byte copy of one tensor."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

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
    """Parse and check a safetensors header (no tensor data is read). Sorted by offset."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw_length = handle.read(8)
        if len(raw_length) < 8:
            raise GQAConvertError(f"{path} is not a safetensors file (too short); re-download it")
        (header_length,) = struct.unpack("<Q", raw_length)
        if header_length > min(size - 8, MAX_HEADER_BYTES):
            raise GQAConvertError(f"{path} has a corrupt header (length {header_length}); re-download it")
        try:
            header = json.loads(handle.read(header_length))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise GQAConvertError(f"{path} has a corrupt header (not JSON); re-download it") from None
    data_start = 8 + header_length
    infos = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = SAFETENSORS_DTYPES[entry["dtype"]]
            begin, end = (int(x) for x in entry["data_offsets"])
            shape = tuple(int(x) for x in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise GQAConvertError(f"{path}: tensor '{name}' has a corrupt header entry; re-download it") from None
        info = TensorInfo(name, shape, dtype, str(path), data_start + begin, data_start + end)
        if info.end - info.begin != info.nbytes or info.end > size:
            raise GQAConvertError(
                f"{path} is truncated or corrupt (tensor '{name}' lies past the end of the file); re-download it"
            )
        infos.append(info)
    return sorted(infos, key=lambda info: info.begin)


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
