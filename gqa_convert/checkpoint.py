"""Reading checkpoints lazily: a Hugging Face folder (safetensors or, when allowed, .bin), a GGUF file,
or a Hub id resolved into the local cache. Tensors are read one at a time; nothing here runs model code.
"""

from __future__ import annotations

import json
import os
import re
import struct
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO, Iterator

import torch

from gqa_convert.architectures import Architecture, architecture_for
from gqa_convert.errors import GQAConvertError

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}  # fmt: skip
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack", ".onnx")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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


@dataclass
class Checkpoint:
    """A source model: its config, its tensors' headers, and a way to read each tensor."""

    source: str  # what the user named
    config: Any  # transformers PretrainedConfig (class defaults resolved)
    config_dict: dict[str, Any]  # config.json as written, to rewrite faithfully
    architecture: Architecture
    tensors: dict[str, TensorInfo]  # in storage order
    folder: Path | None = None  # where non-weight files (tokenizer...) come from
    gguf_file: str | None = None
    _loaded: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)  # in-memory sources
    _open: tuple[str, Any] | None = field(default=None, repr=False)

    def get(self, name: str) -> torch.Tensor:
        if name in self._loaded:
            return self._loaded[name]
        info = self.tensors[name]
        if info.file.endswith(".bin"):
            return self._bin_shard(info.file)[name]
        if self._open is None or self._open[0] != info.file:
            from safetensors import safe_open

            self._open = (info.file, safe_open(info.file, framework="pt"))
        return self._open[1].get_tensor(name)

    def copy_raw(self, name: str, out: BinaryIO) -> bool:
        """Copy a safetensors tensor's bytes without decoding them. False where not possible."""
        info = self.tensors[name]
        if not info.file.endswith(".safetensors"):
            return False
        with open(info.file, "rb") as src:
            _copy_range(src, out, info.begin, info.end - info.begin)
        return True

    def _bin_shard(self, file: str) -> dict[str, torch.Tensor]:
        if self._open is None or self._open[0] != file:
            self._open = (file, torch.load(file, map_location="cpu", weights_only=True, mmap=True))
        return self._open[1]

    def kv_heads(self) -> int:
        from gqa_convert.architectures import kv_heads_of

        return kv_heads_of(self.config, self.architecture)


def _copy_range(src: BinaryIO, dst: BinaryIO, offset: int, length: int) -> None:
    dst.flush()
    try:  # kernel-side copy: no bytes pass through Python
        while length > 0:
            sent = os.copy_file_range(src.fileno(), dst.fileno(), length, offset_src=offset)
            if sent == 0:
                raise GQAConvertError(f"{src.name} ended early: the file is truncated")
            offset, length = offset + sent, length - sent
        return
    except (AttributeError, OSError) as error:
        if isinstance(error, OSError) and error.errno in (28, 27):  # ENOSPC, EFBIG: real write errors
            raise
    src.seek(offset)
    while length > 0:
        chunk = src.read(min(length, 64 << 20))
        if not chunk:
            raise GQAConvertError(f"{src.name} ended early: the file is truncated")
        dst.write(chunk)
        length -= len(chunk)


# ---- safetensors headers -------------------------------------------------------------------------


def read_safetensors_header(path: Path) -> list[TensorInfo]:
    """Parse and check a safetensors header (no tensor data is read)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        raw_length = handle.read(8)
        if len(raw_length) < 8:
            raise GQAConvertError(f"{path} is not a safetensors file (too short); re-download it")
        (header_length,) = struct.unpack("<Q", raw_length)
        if header_length > min(size - 8, 100 << 20):
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


# ---- opening a source ----------------------------------------------------------------------------


def open_checkpoint(source: str | Path, revision: str | None = None, allow_pickle: bool = False) -> Checkpoint:
    """Open SRC: a folder, a .gguf file, or a Hub id (downloaded into the local cache)."""
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        return _open_gguf(path)
    if path.is_file():
        raise GQAConvertError(f"{path} is a file: give the model's folder (with config.json) or a .gguf file")
    if not path.exists():
        if _HUB_ID.match(str(source)) and not str(source).startswith((".", "/")):
            path = _download(str(source), revision)
        else:
            raise GQAConvertError(f"source not found: {source}")
    if revision is not None and Path(source).exists():
        warnings.warn("--revision is ignored for a local folder", stacklevel=2)
    return _open_folder(path, str(source), allow_pickle)


def read_config(folder: Path) -> tuple[dict[str, Any], Any, Architecture]:
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise GQAConvertError(f"{folder} has no config.json: give a Hugging Face model folder")
    try:
        config_dict = json.loads(config_path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise GQAConvertError(f"{config_path} is not valid JSON ({error.msg}, line {error.lineno}); fix it") from None
    if not isinstance(config_dict, dict):
        raise GQAConvertError(f"{config_path} is not a JSON object; fix it")
    arch = architecture_for(config_dict)
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(folder)
    except (ValueError, TypeError, KeyError, OSError) as error:
        raise GQAConvertError(f"{config_path} is not a valid {arch.model_type} config: {error}") from None
    return config_dict, config, arch


def _open_folder(folder: Path, source: str, allow_pickle: bool) -> Checkpoint:
    config_dict, config, arch = read_config(folder)
    tensors: dict[str, TensorInfo] = {}
    for file in _weight_files(folder, allow_pickle):
        infos = read_safetensors_header(file) if file.suffix == ".safetensors" else _bin_infos(file)
        for info in infos:
            tensors[info.name] = info
    return Checkpoint(source, config, config_dict, arch, tensors, folder=folder)


def _weight_files(folder: Path, allow_pickle: bool) -> list[Path]:
    for index_name, single in (("model.safetensors.index.json", "model.safetensors"),
                               ("pytorch_model.bin.index.json", "pytorch_model.bin")):  # fmt: skip
        if single.endswith(".bin") and not allow_pickle:
            if (folder / index_name).exists() or (folder / single).exists():
                raise GQAConvertError(
                    f"{folder} has only pickle (.bin) weights, which can run code when loaded: "
                    "pass --allow-pickle if you trust them (they are read with weights_only=True)"
                )
            continue
        if (folder / index_name).exists():
            try:
                weight_map = json.loads((folder / index_name).read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise GQAConvertError(f"{folder / index_name} is corrupt (no weight_map); re-download it") from None
            files = [folder / name for name in dict.fromkeys(weight_map.values())]
            missing = [file.name for file in files if not file.exists()]
            if missing:
                raise GQAConvertError(f"{folder} is missing shards listed in {index_name}: {', '.join(missing)}")
            return files
        if (folder / single).exists():
            return [folder / single]
    ggufs = sorted(folder.glob("*.gguf"))
    hint = f"; to convert the GGUF, pass the file: {ggufs[0]}" if ggufs else ""
    raise GQAConvertError(f"{folder} has no model.safetensors (or sharded index){hint}")


def _bin_infos(file: Path) -> list[TensorInfo]:
    try:
        state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises many types for corrupt pickles
        raise GQAConvertError(f"{file} could not be read as a weights-only checkpoint: {error}") from None
    return [TensorInfo(name, tuple(t.shape), t.dtype, str(file)) for name, t in state.items()]


def _download(repo_id: str, revision: str | None) -> Path:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
        raise GQAConvertError(f"'{repo_id}' is not a local path and HF_HUB_OFFLINE is set: download it first")
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.txt", "*.model", "tokenizer*", "*.jinja", "*.py"]
    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns))
    except Exception as error:  # network, auth and not-found errors have many types
        raise GQAConvertError(
            f"could not fetch '{repo_id}' from the Hugging Face Hub ({type(error).__name__}); "
            "check the id and your network, or pass a local folder"
        ) from None


def _open_gguf(path: Path) -> Checkpoint:
    """GGUF is dequantized by transformers into memory (GGUF files hold small, quantized models)."""
    try:
        import gguf  # noqa: F401
        from transformers import AutoConfig, AutoModelForCausalLM, GgufConfig
    except ImportError:
        raise GQAConvertError("GGUF input needs the gguf package: pip install gguf") from None
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as error:  # transformers raises several types for unreadable GGUF metadata
        raise GQAConvertError(f"{path} could not be read as GGUF: {error}") from None
    config_dict = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    arch = architecture_for(config_dict)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, config=config, quantization_config=GgufConfig(dequantize=True),
        dtype=torch.float32,
    )
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # tied lm_head: saved once, as transformers does
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach()
    infos = {name: TensorInfo(name, tuple(t.shape), t.dtype, "") for name, t in state.items()}
    return Checkpoint(str(path), config, config_dict, arch, infos, folder=None, gguf_file=str(path), _loaded=state)


def iter_layer_tensors(checkpoint: Checkpoint) -> Iterator[tuple[str, int | None, str]]:
    """(name, layer index or None, suffix within the layer) for every tensor, in storage order."""
    pattern = re.compile(re.escape(checkpoint.architecture.layer_prefix).replace(r"\{layer\}", r"(\d+)"))
    for name in checkpoint.tensors:
        match = pattern.match(name)
        if match:
            yield name, int(match.group(1)), name[match.end() :]
        else:
            yield name, None, name


def read_gguf_summary(path: Path) -> tuple[Any, Architecture, int, str]:
    """Config, row, parameter count and main tensor type of a GGUF file, without dequantizing."""
    try:
        from gguf import GGUFReader
        from transformers import AutoConfig
    except ImportError:
        raise GQAConvertError("GGUF input needs the gguf package: pip install gguf") from None
    try:
        config = AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
        reader = GGUFReader(path)
    except Exception as error:  # transformers and gguf raise several types for unreadable files
        raise GQAConvertError(f"{path} could not be read as GGUF: {error}") from None
    arch = architecture_for(config.to_dict())
    parameters = sum(int(tensor.n_elements) for tensor in reader.tensors)
    by_elements: dict[str, int] = {}
    for tensor in reader.tensors:
        by_elements[tensor.tensor_type.name] = by_elements.get(tensor.tensor_type.name, 0) + int(tensor.n_elements)
    main_type = max(by_elements, key=by_elements.__getitem__) if by_elements else "unknown"
    return config, arch, parameters, f"gguf {main_type}"


def check_model_folder(folder: Path) -> Any:
    """A transformers folder of a supported architecture with safetensors weights (for training and
    eval). Returns its config (class defaults resolved)."""
    if not folder.is_dir():
        raise GQAConvertError(f"model not found: {folder} (give a folder written by gqa-convert or transformers)")
    _, config, _ = read_config(folder)
    _weight_files(folder, allow_pickle=False)
    return config
