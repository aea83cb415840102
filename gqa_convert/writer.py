"""Writing: a sharded safetensors writer that streams each tensor to disk as it is made, and an
atomic output folder (staged beside the target, renamed at the end, removed on any failure).

Every output shape is known before the first byte is written (the converter plans on meta tensors),
so each shard's header is written first and tensors follow in order: memory holds one tensor at a
time however large the shards are. The index is written last.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import struct
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator

import torch

from gqa_convert.checkpoint import SAFETENSORS_DTYPES, tensor_bytes
from gqa_convert.errors import GQAConvertError

_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
_UNITS = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB' or a plain byte count."""
    cleaned = text.strip().upper().replace(" ", "")
    for unit in sorted(_UNITS, key=len, reverse=True):
        if cleaned.endswith(unit):
            number = cleaned[: -len(unit)]
            try:
                return int(float(number) * _UNITS[unit])
            except ValueError:
                break
    if cleaned.isdigit():
        return int(cleaned)
    raise GQAConvertError(f"size '{text}' is not understood: write e.g. 5GB, 500MB or 2GiB")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.shape, self.dtype)


class ShardedWriter:
    """Writes tensors, in the planned order, into shards of at most max_shard_bytes (a larger tensor
    gets a shard of its own), named as transformers names them."""

    def __init__(self, folder: Path, specs: list[TensorSpec], max_shard_bytes: int) -> None:
        self.folder = folder
        self.specs = specs
        shards: list[list[TensorSpec]] = [[]]
        size = 0
        for spec in specs:
            if shards[-1] and size + spec.nbytes > max_shard_bytes:
                shards.append([])
                size = 0
            shards[-1].append(spec)
            size += spec.nbytes
        self.shards = shards
        count = len(shards)
        self.file_names = (
            ["model.safetensors"]
            if count == 1
            else [f"model-{i + 1:05d}-of-{count:05d}.safetensors" for i in range(count)]
        )
        self._shard_of = {spec.name: i for i, shard in enumerate(shards) for spec in shard}
        self._next = 0  # index into specs of the next tensor to write
        self._handle: BinaryIO | None = None
        self._shard = -1

    def _open_shard(self, index: int) -> None:
        if self._handle is not None:
            self._handle.close()
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for spec in self.shards[index]:
            header[spec.name] = {
                "dtype": _DTYPE_NAMES[spec.dtype],
                "shape": list(spec.shape),
                "data_offsets": [offset, offset + spec.nbytes],
            }
            offset += spec.nbytes
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the format aligns data to 8 bytes
        self._handle = open(self.folder / self.file_names[index], "wb")
        self._handle.write(struct.pack("<Q", len(encoded)) + encoded)
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
            (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        return self.file_names


def check_output_folder(out: Path, source: Path | None, force: bool) -> None:
    """Refuse an output that would overwrite the source or a user's files; nothing is touched."""
    out = out.resolve()
    if source is not None:
        source = source.resolve()
        source_dir = source if source.is_dir() else source.parent
        if out == source_dir or source_dir in out.parents:
            raise GQAConvertError(f"output {out} is inside the source {source_dir}: choose a folder outside it")
        if source.is_dir() and out in source.parents:
            raise GQAConvertError(f"output {out} contains the source {source}: choose another folder")
    if out.exists() and not out.is_dir():
        raise GQAConvertError(f"output {out} exists and is a file: choose a folder path")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise GQAConvertError(f"output folder {out} is not empty: pass --force to replace it")


@contextlib.contextmanager
def staged_output(out: Path) -> Iterator[Path]:
    """Yield a temporary folder beside `out`; on success it replaces `out`, on failure it is removed."""
    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield staging
    except OSError as error:
        shutil.rmtree(staging, ignore_errors=True)
        if error.errno in (errno.ENOSPC, errno.EFBIG, errno.EDQUOT):
            raise GQAConvertError(
                f"no space left while writing {out.name} ({os.strerror(error.errno)}); "
                f"nothing was written to {out}: free space and run again"
            ) from None
        raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if out.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        out.rename(trash / "old")
        staging.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        staging.rename(out)
