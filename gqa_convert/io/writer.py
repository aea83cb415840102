"""A sharded safetensors writer that streams each tensor to disk as it is made.

Every output shape is known before the first byte is written (the converter plans on meta tensors),
so each shard's header is written first and tensors follow in order: memory holds one tensor at a
time however large the shards are. The index is written last.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from gqa_convert.io.safetensors_format import DTYPE_NAMES, tensor_bytes

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.shape, self.dtype)


def plan_shards(specs: list[TensorSpec], max_shard_bytes: int) -> list[list[TensorSpec]]:
    """Consecutive tensors into shards of at most max_shard_bytes (a larger tensor gets its own)."""
    shards: list[list[TensorSpec]] = [[]]
    size = 0
    for spec in specs:
        if shards[-1] and size + spec.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(spec)
        size += spec.nbytes
    return shards


def shard_names(count: int) -> list[str]:
    """The names transformers gives shards."""
    if count == 1:
        return ["model.safetensors"]
    return [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]


def encode_header(shard: list[TensorSpec]) -> bytes:
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for spec in shard:
        header[spec.name] = {
            "dtype": DTYPE_NAMES[spec.dtype],
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the format aligns data to 8 bytes
    return struct.pack("<Q", len(encoded)) + encoded


class ShardedWriter:
    """Writes tensors, in the planned order, into shards named as transformers names them."""

    def __init__(self, folder: Path, specs: list[TensorSpec], max_shard_bytes: int) -> None:
        self.folder = folder
        self.specs = specs
        self.shards = plan_shards(specs, max_shard_bytes)
        self.file_names = shard_names(len(self.shards))
        self._shard_of = {spec.name: i for i, shard in enumerate(self.shards) for spec in shard}
        self._next = 0  # index into specs of the next tensor to write
        self._handle: BinaryIO | None = None
        self._shard = -1

    def _open_shard(self, index: int) -> None:
        if self._handle is not None:
            self._handle.close()
        self._handle = open(self.folder / self.file_names[index], "wb")
        self._handle.write(encode_header(self.shards[index]))
        self._shard = index

    def next_spec(self) -> TensorSpec:
        return self.specs[self._next]

    def _begin(self, name: str) -> tuple[TensorSpec, BinaryIO]:
        spec = self.specs[self._next]
        assert spec.name == name, f"planned {spec.name}, got {name}"
        if self._shard_of[name] != self._shard:
            self._open_shard(self._shard_of[name])
        self._next += 1
        assert self._handle is not None
        return spec, self._handle

    def write(self, name: str, tensor: torch.Tensor) -> None:
        spec, handle = self._begin(name)
        assert tuple(tensor.shape) == spec.shape and tensor.dtype == spec.dtype, (name, tensor.shape, spec)
        data = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
        handle.write(memoryview(data.numpy()))

    def write_raw(self, name: str, copy: Callable[[BinaryIO], bool]) -> bool:
        """Let the source copy its own bytes (same dtype and shape); False if it cannot."""
        spec = self.specs[self._next]
        if spec.name != name:
            return False
        spec, handle = self._begin(name)
        if copy(handle):
            handle.seek(0, os.SEEK_END)
            return True
        self._next -= 1  # not written: the caller writes the decoded tensor instead
        return False

    def finish(self) -> list[str]:
        assert self._next == len(self.specs), f"wrote {self._next} of {len(self.specs)} tensors"
        if self._handle is not None:
            self._handle.close()
        if not self.specs:  # a model with no tensors still gets a valid (empty) file
            self._open_shard(0)
            assert self._handle is not None
            self._handle.close()
        if len(self.file_names) > 1:
            index = {
                "metadata": {"total_size": sum(spec.nbytes for spec in self.specs)},
                "weight_map": {spec.name: self.file_names[self._shard_of[spec.name]] for spec in self.specs},
            }
            (self.folder / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return self.file_names
