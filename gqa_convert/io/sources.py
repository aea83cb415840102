"""Opening a source model lazily: a Hugging Face folder (safetensors or, when allowed, .bin), a GGUF
file, or a Hub id resolved into the local cache. Tensors are read one at a time; nothing here runs
model code (trust_remote_code is never set)."""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import torch
from safetensors import safe_open

from gqa_convert.arch import Architecture, architecture_for, check_head_counts, kv_heads_of
from gqa_convert.errors import GQAConvertError, one_line
from gqa_convert.io.completeness import check_tensor_names
from gqa_convert.io.gguf import gguf_config, gguf_tokenizer, is_gguf, load_gguf_model
from gqa_convert.io.safetensors_format import TensorInfo, copy_range
from gqa_convert.io.vocabulary import check_tokenizer_fits
from gqa_convert.io.weight_files import load_pickle, read_weight_headers

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# Any of these makes AutoTokenizer able to load (a fast tokenizer, sentencepiece, or BPE files).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")


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
    _tokenizer: Any = field(default=None, repr=False)  # read once: a GGUF's is parsed from the whole file

    def get(self, name: str) -> torch.Tensor:
        if name in self._loaded:
            return self._loaded[name]
        info = self.tensors[name]
        if info.file.endswith(".bin"):
            return self._bin_shard(info.file)[name]
        if self._open is None or self._open[0] != info.file:
            self._open = (info.file, safe_open(info.file, framework="pt"))
        return self._open[1].get_tensor(name)

    def copy_raw(self, name: str, out: BinaryIO) -> bool:
        """Copy a safetensors tensor's bytes without decoding them. False where not possible."""
        info = self.tensors[name]
        if not info.file.endswith(".safetensors"):
            return False
        with open(info.file, "rb") as src:
            copy_range(src, out, info.begin, info.end - info.begin)
        return True

    def _bin_shard(self, file: str) -> dict[str, torch.Tensor]:
        if self._open is None or self._open[0] != file:
            self._open = (file, load_pickle(Path(file)))
        return self._open[1]

    def kv_heads(self) -> int:
        return kv_heads_of(self.config, self.architecture)

    def tokenizer(self, check_vocab: bool = False) -> Any:
        """The source's tokenizer (from the folder or the GGUF metadata); with check_vocab (its ids
        will enter the model), refused when its ids can reach config.vocab_size."""
        if self._tokenizer is None:
            self._tokenizer = (
                gguf_tokenizer(Path(self.gguf_file)) if self.gguf_file is not None else load_tokenizer(self.folder)
            )
        tokenizer = self._tokenizer
        if check_vocab:
            check_tokenizer_fits(tokenizer, self.config, self.source)
        return tokenizer

    def layer_tensors(self) -> Iterator[tuple[str, int | None, str]]:
        """(name, layer index or None, suffix within the layer) for every tensor, in storage order."""
        pattern = re.compile(re.escape(self.architecture.layer_prefix).replace(r"\{layer\}", r"(\d+)"))
        for name in self.tensors:
            match = pattern.match(name)
            if match:
                yield name, int(match.group(1)), name[match.end() :]
            else:
                yield name, None, name


def open_checkpoint(source: str | Path, revision: str | None = None, allow_pickle: bool = False) -> Checkpoint:
    """Open SRC: a folder, a .gguf file, or a Hub id (downloaded into the local cache)."""
    path = Path(source)
    if is_gguf(path):
        return _open_gguf(path)
    if path.is_file():
        raise GQAConvertError(f"{path} is a file: give the model's folder (with config.json) or a .gguf file")
    if not path.exists():
        if _HUB_ID.match(str(source)) and not str(source).startswith((".", "/")):
            path = _download(str(source), revision)
        else:
            raise GQAConvertError(f"source not found: {source}")
    elif revision is not None:
        warnings.warn("--revision is ignored for a local folder", stacklevel=2)
    return _open_folder(path, str(source), allow_pickle)


def read_config(folder: Path) -> tuple[dict[str, Any], Any, Architecture]:
    """config.json as written, the transformers config, and the architecture row."""
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
    except Exception as error:  # transformers and its strict dataclasses raise many types
        raise GQAConvertError(f"{config_path} is not a valid {arch.model_type} config: {one_line(error)}") from None
    check_head_counts(config, arch)
    return config_dict, config, arch


def check_model_folder(folder: Path) -> Any:
    """A transformers folder of a supported architecture with safetensors weights (for training and
    eval). Every tensor its config needs must be there. Returns its config (class defaults resolved)."""
    if is_gguf(folder):
        raise GQAConvertError(
            f"{folder} is a GGUF file and this command trains a transformers folder: convert it first, "
            f"e.g. gqa-convert pool {folder} -o FOLDER --kv-heads N"
        )
    if not folder.is_dir():
        raise GQAConvertError(f"model not found: {folder} (give a folder written by gqa-convert or transformers)")
    _, config, arch = read_config(folder)
    kv_heads = kv_heads_of(config, arch)
    pickle_fix = (
        "this command reads safetensors; write a safetensors copy once with "
        f"gqa-convert pool {folder} -o FOLDER --kv-heads {kv_heads} --recipe mean --allow-pickle "
        "(the current kv count copies it exactly)"
    )
    tensors = read_weight_headers(folder, allow_pickle=False, pickle_fix=pickle_fix)
    check_tensor_names(config, list(tensors), str(folder))
    return config


def declared_dtype(folder: Path) -> torch.dtype:
    """The dtype a transformers folder's config.json declares (float32 when it declares none)."""
    config = json.loads((folder / "config.json").read_text())
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    dtype = getattr(torch, str(name).removeprefix("torch."), None)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def model_config(source: str | Path) -> Any:
    """The transformers config of a model folder or a .gguf file (checked like check_model_folder)."""
    path = Path(source)
    if not is_gguf(path):
        return check_model_folder(path)
    config = gguf_config(path)
    check_head_counts(config, architecture_for(config.to_dict()))
    return config


def load_causal_lm(source: str | Path, dtype: torch.dtype = torch.float32) -> Any:
    """A whole model from a transformers folder or a .gguf file (dequantized)."""
    path = Path(source)
    if is_gguf(path):
        return load_gguf_model(path, dtype=dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=dtype)


def load_tokenizer(source: str | Path | None, check_vocab: bool = False) -> Any:
    """The tokenizer saved with a model folder (or a .gguf file's), or an error naming the fix. With
    check_vocab (its ids will enter that model), refused when its ids can reach config.vocab_size."""
    tokenizer = _tokenizer_of(Path(str(source)))
    if check_vocab:
        check_tokenizer_fits(tokenizer, model_config(str(source)), source)
    return tokenizer


def _tokenizer_of(path: Path) -> Any:
    if is_gguf(path):
        return gguf_tokenizer(path)
    if not path.exists():
        if not _HUB_ID.match(str(path)) or str(path).startswith((".", "/")):
            raise GQAConvertError(f"tokenizer not found: {path} does not exist (give a model folder or a .gguf file)")
        if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False"):
            raise GQAConvertError(f"'{path}' is not a local path and HF_HUB_OFFLINE is set: download it first")
    elif not path.is_dir():
        raise GQAConvertError(f"{path} is a file: give the model folder that holds the tokenizer, or a .gguf file")
    if path.is_dir() and not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise GQAConvertError(
            f"{path} has no tokenizer ({' or '.join(TOKENIZER_FILES[:2])}): save the tokenizer with the model "
            "(tokenizer.save_pretrained(folder))"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as error:  # transformers raises many types for unusable tokenizer files
        raise GQAConvertError(f"{path} has no usable tokenizer ({one_line(error)}): save one with the model") from None


def _open_folder(folder: Path, source: str, allow_pickle: bool) -> Checkpoint:
    config_dict, config, arch = read_config(folder)
    tensors = read_weight_headers(folder, allow_pickle)
    check_tensor_names(config, list(tensors), str(folder))
    return Checkpoint(source, config, config_dict, arch, tensors, folder=folder)


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
    config = gguf_config(path)
    config_dict = {k: v for k, v in config.to_dict().items() if not k.startswith("_")}
    arch = architecture_for(config_dict)
    check_head_counts(config, arch)
    model = load_gguf_model(path, config)
    state: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in seen:  # tied lm_head: saved once, as transformers does
            continue
        seen.add(tensor.data_ptr())
        state[name] = tensor.detach()
    infos = {name: TensorInfo(name, tuple(t.shape), t.dtype, "") for name, t in state.items()}
    return Checkpoint(str(path), config, config_dict, arch, infos, folder=None, gguf_file=str(path), _loaded=state)
