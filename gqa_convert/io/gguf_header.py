"""A GGUF file's metadata and tensor headers, read with `struct` from a memory map: what `inspect`
needs, in milliseconds at any file size (nothing is dequantized; the vocabulary strings are skipped)."""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from gqa_convert.errors import GQAConvertError

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_LARGE_ARRAY = 4096  # numeric arrays longer than this (token scores, types) are given as their length

# GGUF general.architecture -> Hugging Face model_type, for the architectures gqa-convert knows.
# Mistral GGUFs say "llama"; transformers tells them apart by general.name, as done here.
GGUF_MODEL_TYPES = {
    "llama": "llama",
    "qwen2": "qwen2",
    "qwen2moe": "qwen2_moe",
    "qwen3": "qwen3",
    "gemma": "gemma",
    "gemma2": "gemma2",
    "gemma3": "gemma3_text",
    "phi2": "phi",
    "phi3": "phi3",
    "stablelm": "stablelm",
    "olmo": "olmo",
    "olmo2": "olmo2",
    "starcoder2": "starcoder2",
    "falcon": "falcon",
    "command-r": "cohere",
    "granite": "granite",
}


def _read_string(data: Any, offset: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", data, offset)
    end = offset + 8 + length
    if end > len(data):
        raise struct.error("string past the end")
    return data[offset + 8 : end].decode("utf-8", errors="replace"), end


def _read_value(data: Any, offset: int, value_type: int) -> tuple[Any, int]:
    if value_type == _STRING:
        return _read_string(data, offset)
    if value_type == _ARRAY:
        item_type, count = struct.unpack_from("<IQ", data, offset)
        offset += 12
        if item_type == _STRING:  # the vocabulary and merges: only the count is kept
            for _ in range(count):
                (length,) = struct.unpack_from("<Q", data, offset)
                offset += 8 + length
            return {"array_of_strings": count}, offset
        fmt = _SCALARS[item_type]
        size = struct.calcsize(fmt)
        if count > _LARGE_ARRAY:
            return {"array_length": count}, offset + size * count
        return list(struct.unpack_from(f"<{count}{fmt[1]}", data, offset)), offset + size * count
    fmt = _SCALARS[value_type]
    return struct.unpack_from(fmt, data, offset)[0], offset + struct.calcsize(fmt)


def _tensor_bytes(dims: tuple[int, ...], ggml_type: int) -> int:
    """The bytes of a tensor's data (0 where the type is unknown: only its start is then checked)."""
    try:
        from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType

        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ImportError, ValueError, KeyError):
        return 0
    elements = 1
    for dim in dims:
        elements *= dim
    return -(-elements // block) * size


def _check_data_within(path: Path, file_size: int, data_start: int, tensors: list[tuple[Any, ...]]) -> None:
    """Every tensor's data must lie within the file: a download cut short is refused, not described."""
    for name, dims, ggml_type, tensor_offset in tensors:
        end = data_start + tensor_offset + max(_tensor_bytes(dims, ggml_type), 1)
        if end > file_size:
            raise GQAConvertError(
                f"{path} is truncated: tensor {name} ends at byte {end:,} but the file has {file_size:,} bytes; "
                "re-download it"
            )


def read_gguf_header(path: Path) -> tuple[dict[str, Any], list[tuple[str, tuple[int, ...], int]]]:
    """(metadata, [(tensor name, shape as GGUF stores it, ggml type id)]), once every tensor's data is
    known to lie within the file."""
    try:
        with open(path, "rb") as handle:
            data = mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
    except ValueError:
        raise GQAConvertError(f"{path} is empty: re-download it") from None
    except OSError as error:
        raise GQAConvertError(f"cannot read {path} ({error.strerror}): make it readable") from None
    try:
        if data[:4] != b"GGUF":
            raise GQAConvertError(f"{path} is not a GGUF file (bad magic); re-download it")
        version, tensor_count, kv_count = struct.unpack_from("<IQQ", data, 4)
        if version not in (2, 3):
            raise GQAConvertError(f"{path}: GGUF version {version} is not supported (2 or 3)")
        offset = 24
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key, offset = _read_string(data, offset)
            (value_type,) = struct.unpack_from("<I", data, offset)
            metadata[key], offset = _read_value(data, offset + 4, value_type)
        tensors = []
        for _ in range(tensor_count):
            name, offset = _read_string(data, offset)
            (n_dims,) = struct.unpack_from("<I", data, offset)
            dims = struct.unpack_from(f"<{n_dims}Q", data, offset + 4)
            ggml_type, tensor_offset = struct.unpack_from("<IQ", data, offset + 4 + 8 * n_dims)
            tensors.append((name, tuple(dims), ggml_type, tensor_offset))
            offset += 4 + 8 * n_dims + 12
        alignment = metadata.get("general.alignment", 32)
        if not isinstance(alignment, int) or alignment < 1:
            raise struct.error("bad alignment")
        _check_data_within(path, len(data), -(-offset // alignment) * alignment, tensors)
    except (struct.error, KeyError, OverflowError, MemoryError):
        raise GQAConvertError(f"{path} has a truncated or corrupt GGUF header; re-download it") from None
    finally:
        data.close()
    return metadata, [(name, dims, ggml_type) for name, dims, ggml_type, _ in tensors]


def _type_name(ggml_type: int) -> str:
    try:
        from gguf import GGMLQuantizationType

        return GGMLQuantizationType(ggml_type).name
    except (ImportError, ValueError):
        return f"type {ggml_type}"


def _one_kv_count(path: Path, value: Any) -> int:
    """Some GGUFs store the kv head count per layer: a single value is what a GQA model has."""
    if isinstance(value, list):
        if len(set(value)) != 1:
            raise GQAConvertError(
                f"{path} has different kv head counts per layer ({sorted(set(value))}): not supported"
            )
        return int(value[0])
    return int(value)


def gguf_metadata(path: Path) -> dict[str, Any]:
    """The figures `inspect` needs, under Hugging Face config names, from the header alone."""
    meta, tensors = read_gguf_header(path)
    arch = meta.get("general.architecture")
    if arch is None:
        raise GQAConvertError(f"{path} has no general.architecture: not a model GGUF")
    model_type = GGUF_MODEL_TYPES.get(arch)
    if model_type is None:
        raise GQAConvertError(f"GGUF architecture '{arch}' is not supported; supported: {', '.join(GGUF_MODEL_TYPES)}")
    if model_type == "llama" and "mistral" in str(meta.get("general.name", "")).lower():
        model_type = "mistral"

    def required(key: str) -> Any:
        if key not in meta:
            raise GQAConvertError(f"{path} lacks the GGUF key {key}: the file is incomplete; re-download it")
        return meta[key]

    heads = int(required(f"{arch}.attention.head_count"))
    hidden = int(required(f"{arch}.embedding_length"))
    by_type: dict[str, int] = {}
    for _name, dims, ggml_type in tensors:
        elements = 1
        for size in dims:
            elements *= size
        by_type[_type_name(ggml_type)] = by_type.get(_type_name(ggml_type), 0) + elements
    return {
        "model_type": model_type,
        "num_hidden_layers": int(required(f"{arch}.block_count")),
        "num_attention_heads": heads,
        "num_key_value_heads": _one_kv_count(path, meta.get(f"{arch}.attention.head_count_kv", heads)),
        "hidden_size": hidden,
        "head_dim": int(meta.get(f"{arch}.attention.key_length", hidden // heads)),
        "parameters": sum(by_type.values()),
        "main_type": max(by_type, key=by_type.__getitem__) if by_type else "unknown",
    }
