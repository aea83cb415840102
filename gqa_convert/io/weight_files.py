"""The weight files of a model folder and their tensor headers: which files (single file or sharded
index), pickle weights only when allowed, and the index checked against the shards before any work
(a tensor it lists must be in the shard it names, a shard it forgets is an error)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from gqa_convert.errors import GQAConvertError, one_line
from gqa_convert.io.safetensors_format import TensorInfo, read_safetensors_header

INDEXES = (
    ("model.safetensors.index.json", "model.safetensors"),
    ("pytorch_model.bin.index.json", "pytorch_model.bin"),
)
PICKLE_FIX = "pass --allow-pickle if you trust them (they are read with weights_only=True)"
_SHARD_NAME = re.compile(r"^(?P<stem>.+)-(?P<number>\d+)-of-(?P<total>\d+)(?P<suffix>\.safetensors|\.bin)$")


def read_weight_headers(folder: Path, allow_pickle: bool, pickle_fix: str = PICKLE_FIX) -> dict[str, TensorInfo]:
    """Every tensor's header, in storage order, after the index and shards were checked against
    each other. `pickle_fix` says how to get past pickle-only weights when they are not allowed."""
    files, index = weight_files(folder, allow_pickle, pickle_fix)
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        infos = read_safetensors_header(file) if file.suffix == ".safetensors" else pickle_infos(file)
        for info in infos:
            if info.name in tensors:
                first = Path(tensors[info.name].file).name
                raise GQAConvertError(
                    f"tensor '{info.name}' is stored twice, in {first} and {file.name}: the checkpoint is corrupt; "
                    "re-download it"
                )
            tensors[info.name] = info
    if index is not None:
        _check_index(folder, index, tensors)
    return tensors


def weight_files(folder: Path, allow_pickle: bool, pickle_fix: str = PICKLE_FIX) -> tuple[list[Path], Any]:
    """The weight files to read, and (sharded checkpoints) the index's name and weight map."""
    for index_name, single in INDEXES:
        if single.endswith(".bin") and not allow_pickle:
            if (folder / index_name).exists() or (folder / single).exists():
                raise GQAConvertError(
                    f"{folder} has only pickle (.bin) weights, which can run code when loaded: {pickle_fix}"
                )
            continue
        if (folder / index_name).exists():
            weight_map = _weight_map(folder / index_name)
            return _indexed_files(folder, index_name, weight_map), (index_name, weight_map)
        if (folder / single).exists():
            return [folder / single], None
    ggufs = sorted(folder.glob("*.gguf"))
    hint = f"; to convert the GGUF, pass the file: {ggufs[0]}" if ggufs else ""
    raise GQAConvertError(f"{folder} has no model.safetensors (or sharded index){hint}")


def _weight_map(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError):
        raise GQAConvertError(f"{path} is corrupt (no weight_map); re-download it") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise GQAConvertError(f"{path} is corrupt (its weight_map is not names of shards); re-download it")
    return weight_map


def _indexed_files(folder: Path, index_name: str, weight_map: dict[str, str]) -> list[Path]:
    names = list(dict.fromkeys(weight_map.values()))
    outside = [name for name in names if Path(name).name != name or name in ("", ".", "..")]
    if outside:
        raise GQAConvertError(f"{folder / index_name} names shards outside the folder ({outside[0]}); re-download it")
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise GQAConvertError(f"{folder} is missing shards listed in {index_name}: {', '.join(missing)}")
    forgotten = _unlisted_shards(folder, names)
    if forgotten:
        raise GQAConvertError(
            f"{index_name} does not list the shard{'s' * (len(forgotten) > 1)} {', '.join(forgotten)} of {folder}: "
            "the index is incomplete; re-download it"
        )
    return [folder / name for name in names]


def _unlisted_shards(folder: Path, listed: list[str]) -> list[str]:
    """Shards named like the listed ones (same stem and count, model-0000i-of-0000n) that the index omits."""
    families = {(m["stem"], m["total"], m["suffix"]) for m in map(_SHARD_NAME.match, listed) if m}
    found = []
    for path in sorted(folder.iterdir()):
        match = _SHARD_NAME.match(path.name)
        if match and (match["stem"], match["total"], match["suffix"]) in families and path.name not in listed:
            found.append(path.name)
    return found


def _check_index(folder: Path, index: tuple[str, dict[str, str]], tensors: dict[str, TensorInfo]) -> None:
    index_name, weight_map = index
    for name, shard in weight_map.items():
        if name not in tensors:
            raise GQAConvertError(
                f"{index_name} lists '{name}' in {shard}, which does not hold it: the checkpoint is corrupt; "
                "re-download it"
            )
        if Path(tensors[name].file).name != shard:
            raise GQAConvertError(
                f"{index_name} puts '{name}' in {shard} but it is in {Path(tensors[name].file).name}: "
                "the index does not match the shards; re-download it"
            )
    unlisted = [name for name in tensors if name not in weight_map]
    if unlisted:
        raise GQAConvertError(
            f"{Path(tensors[unlisted[0]].file).name} holds '{unlisted[0]}', which {index_name} does not list "
            f"({len(unlisted)} such tensors): the index does not match the shards; re-download it"
        )


def load_pickle(file: Path) -> dict[str, torch.Tensor]:
    """A pickle state dict read with weights_only=True (memory-mapped where the format allows)."""
    try:
        try:
            state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as error:
            if "mmap" not in str(error):
                raise
            # the legacy (non-zip) torch.save format cannot be memory-mapped: read it whole
            state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for corrupt or hostile pickles
        raise GQAConvertError(f"{file} could not be read as a weights-only checkpoint: {one_line(error)}") from None
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise GQAConvertError(f"{file} does not hold a state dict (names to tensors): give the model's weights file")
    return state


def pickle_infos(file: Path) -> list[TensorInfo]:
    return [TensorInfo(name, tuple(t.shape), t.dtype, str(file)) for name, t in load_pickle(file).items()]
