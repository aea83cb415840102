"""Checkpoint files that cannot run code: a torch.distributed.checkpoint (DCP) storage of safetensors
and JSON, for ddp and fsdp2.

DCP plans which process writes which piece of each tensor (no process gathers the state) and, on load,
which pieces each process reads (resharding onto any number of processes, ddp <-> fsdp2). Its own
file storage keeps the plan's metadata and non-tensor values as pickles, which a tampered checkpoint
turns into code run on --resume. Here each process streams its pieces into one safetensors file
(state-rankNNNNN.safetensors, one tensor at a time) and the coordinator writes the index as JSON
(state.json). Only tensors are stored: the caller keeps non-tensor state (the optimizer's
hyperparameters) out of the state dict. Reading checks the index's schema and every piece's file,
name, dtype and shape, and reads only the slices a process needs; anything else is one "damaged" line.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from gqa_convert.errors import GQAConvertError, one_line
from gqa_convert.io.safetensors_format import SAFETENSORS_DTYPES
from gqa_convert.io.writer import TensorSpec, encode_header

INDEX = "state.json"
FORMAT = "gqa-convert-dcp"
FORMAT_VERSION = 1
MAX_INDEX_BYTES = 1 << 30
_FILE = re.compile(r"state-rank\d{5}\.safetensors")
_DTYPE_NAMES = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}


class Damaged(GQAConvertError):
    """A checkpoint's files are not what this tool writes (`what` says how)."""

    def __init__(self, message: str, what: str = "") -> None:
        super().__init__(message)
        self.what = what

    def __reduce__(self) -> tuple:  # DCP sends a process's failure to the others
        return Damaged, (str(self), self.what)


def damaged(folder: Path, what: str) -> Damaged:
    return Damaged(
        f"checkpoint {folder.name} is damaged ({what}): delete {folder} to resume from the one before it, "
        "or start afresh with --force",
        what,
    )


def save_tensors(state: dict[str, Any], folder: Path) -> None:
    """Collective: every process writes its pieces of `state` (nested dicts of tensors and DTensors)."""
    dcp.save(state, storage_writer=SafetensorsWriter(folder))


def load_tensors(state: dict[str, Any], folder: Path) -> None:
    """Collective: fill `state`'s tensors in place from the checkpoint (resharded as needed)."""
    try:
        dcp.load(state, storage_reader=SafetensorsReader(folder))
    except BaseException as error:  # DCP wraps each process's failure in a CheckpointException
        found = _damage_in(error)
        if found is not None:
            raise found from None
        if isinstance(error, RuntimeError | ValueError | KeyError) and "checkpoint" in str(error).lower():
            raise damaged(folder, one_line(error)[:300]) from None  # e.g. a tensor the state needs is missing
        raise


def _damage_in(error: BaseException | None, depth: int = 0) -> Damaged | None:
    if error is None or depth > 20:
        return None
    if isinstance(error, Damaged):
        return error
    failures = getattr(error, "failures", None)
    if isinstance(failures, dict):
        for failure in failures.values():
            found = _damage_in(failure[0] if isinstance(failure, tuple) else failure, depth + 1)
            if found is not None:
                return found
    return _damage_in(error.__cause__ or error.__context__, depth + 1)


class SafetensorsWriter(StorageWriter):
    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = Path(folder)

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return [replace(plan, storage_data=f"state-rank{rank:05d}.safetensors") for rank, plan in enumerate(plans)]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        """One file per process, its header first, then each piece as it is resolved (one in memory)."""
        name, results, specs = plan.storage_data, [], []
        for number, item in enumerate(plan.items):
            assert item.type != WriteItemType.BYTE_IO, f"{item.index.fqn}: only tensors are stored"
            data = item.tensor_data
            specs.append(TensorSpec(f"{number}", tuple(data.chunk.sizes), data.properties.dtype))
        with open(self.folder / name, "wb") as handle:
            handle.write(encode_header(specs))
            for item, spec in zip(plan.items, specs):
                tensor = planner.resolve_data(item).detach()
                assert tuple(tensor.shape) == spec.shape and tensor.dtype == spec.dtype, (item.index, tensor.shape)
                handle.write(memoryview(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
                results.append(WriteResult(item.index, spec.nbytes, {"file": name, "key": spec.name}))
            handle.flush()
            os.fsync(handle.fileno())
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """The coordinator writes the index: each tensor's dtype, size and pieces (file, key, place)."""
        where = {(r.index.fqn, tuple(r.index.offset)): r.storage_data for rank in results for r in rank}
        tensors = {}
        for fqn, entry in metadata.state_dict_metadata.items():
            assert isinstance(entry, TensorStorageMetadata), f"{fqn}: only tensors are stored"
            chunks = [
                {"offsets": list(c.offsets), "sizes": list(c.sizes), **where[(fqn, tuple(c.offsets))]}
                for c in entry.chunks
            ]
            tensors[fqn] = {"dtype": _DTYPE_NAMES[entry.properties.dtype], "size": list(entry.size), "chunks": chunks}
        staged = self.folder / f".{INDEX}.tmp"
        staged.write_text(json.dumps({"format": FORMAT, "format_version": FORMAT_VERSION, "tensors": tensors}))
        staged.replace(self.folder / INDEX)

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=str(self.folder))

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True


class SafetensorsReader(StorageReader):
    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = Path(folder)
        self.places: dict[MetadataIndex, tuple[str, str]] = {}

    def reset(self, checkpoint_id: str | os.PathLike | None = None) -> None:
        pass

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        tensors, self.places = {}, {}
        for fqn, entry in read_index(self.folder).items():
            chunks = []
            for chunk in entry["chunks"]:
                offsets, sizes = torch.Size(chunk["offsets"]), torch.Size(chunk["sizes"])
                chunks.append(ChunkStorageMetadata(offsets=offsets, sizes=sizes))
                self.places[MetadataIndex(fqn, offsets)] = (chunk["file"], chunk["key"])
            properties = TensorProperties(dtype=SAFETENSORS_DTYPES[entry["dtype"]])
            tensors[fqn] = TensorStorageMetadata(properties=properties, size=torch.Size(entry["size"]), chunks=chunks)
        return Metadata(state_dict_metadata=tensors, storage_data=dict(self.places))

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self._metadata, self.places = metadata, metadata.storage_data

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        from safetensors import SafetensorError, safe_open

        by_file: dict[str, list[Any]] = {}
        for item in plan.items:
            by_file.setdefault(self.places[item.storage_index][0], []).append(item)
        for name, items in by_file.items():
            try:
                with safe_open(str(self.folder / name), framework="pt") as handle:
                    for item in items:
                        self._read(handle, item, planner)
            except (SafetensorError, OSError) as error:
                raise damaged(self.folder, f"{name}: {one_line(error)[:200]}") from None
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _read(self, handle: Any, item: Any, planner: LoadPlanner) -> None:
        name, key = self.places[item.storage_index]
        if key not in handle.keys():
            raise damaged(self.folder, f"{name} lacks the piece {key} of {item.storage_index.fqn}")
        piece = handle.get_slice(key)
        expected = self._chunk_sizes(item)
        if tuple(piece.get_shape()) != expected or piece.get_dtype() != self._dtype_name(item):
            raise damaged(self.folder, f"{name}: piece {key} of {item.storage_index.fqn} has another shape or dtype")
        slices = tuple(slice(o, o + n) for o, n in zip(item.storage_offsets, item.lengths))
        tensor = piece[slices] if slices else handle.get_tensor(key)
        target = planner.resolve_tensor(item).detach()
        target.copy_(tensor.reshape(target.shape))
        planner.commit_tensor(item, target)

    def _chunk_sizes(self, item: Any) -> tuple[int, ...]:
        entry = self._metadata.state_dict_metadata[item.storage_index.fqn]
        offsets = tuple(item.storage_index.offset)
        return next(tuple(c.sizes) for c in entry.chunks if tuple(c.offsets) == offsets)

    def _dtype_name(self, item: Any) -> str:
        return _DTYPE_NAMES[self._metadata.state_dict_metadata[item.storage_index.fqn].properties.dtype]

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return True


def read_index(folder: Path) -> dict[str, dict[str, Any]]:
    """state.json, schema-checked: plain file names inside the folder, known dtypes, whole numbers,
    pieces inside their tensor. Raises Damaged naming what is wrong."""
    path = folder / INDEX
    try:
        if path.is_symlink() or not path.is_file():
            raise damaged(folder, f"{INDEX} is missing")
        if path.stat().st_size > MAX_INDEX_BYTES:
            raise damaged(folder, f"{INDEX} is larger than any index")
        index = json.loads(path.read_bytes())
    except (OSError, ValueError, RecursionError) as error:
        raise damaged(folder, f"{INDEX} is unreadable: {one_line(error)[:120]}") from None
    if not isinstance(index, dict) or index.get("format") != FORMAT or index.get("format_version") != FORMAT_VERSION:
        raise damaged(folder, f"{INDEX} is not a gqa-convert checkpoint index of version {FORMAT_VERSION}")
    tensors = index.get("tensors")
    if not isinstance(tensors, dict):
        raise damaged(folder, f"{INDEX} lists no tensors")
    for fqn, entry in tensors.items():
        problem = _entry_problem(entry, folder)
        if problem:
            raise damaged(folder, f"{INDEX}: {fqn[:120]}: {problem}")
    return tensors


def _whole_numbers(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in value)


def _entry_problem(entry: Any, folder: Path) -> str | None:
    if not isinstance(entry, dict) or entry.get("dtype") not in SAFETENSORS_DTYPES:
        return "no known dtype"
    size, chunks = entry.get("size"), entry.get("chunks")
    if not _whole_numbers(size) or not isinstance(chunks, list):
        return "no size or pieces"
    for chunk in chunks:
        if (
            not isinstance(chunk, dict)
            or not _whole_numbers(chunk.get("offsets"))
            or not _whole_numbers(chunk.get("sizes"))
        ):
            return "a piece without offsets and sizes"
        if not len(chunk["offsets"]) == len(chunk["sizes"]) == len(size):
            return "a piece of another rank"
        if any(o + n > s for o, n, s in zip(chunk["offsets"], chunk["sizes"], size)):
            return "a piece outside its tensor"
        file = chunk.get("file")
        if not isinstance(file, str) or not _FILE.fullmatch(file) or not isinstance(chunk.get("key"), str):
            return f"a piece in a file that is not one of its state files ({str(file)[:60]})"
        if (folder / file).is_symlink() or not (folder / file).is_file():
            return f"{file} is missing"
    return None
