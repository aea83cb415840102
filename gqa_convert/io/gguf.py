"""GGUF files (llama.cpp's format), read through transformers and the gguf package: the one place
that opens them, so every command gives the same errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from gqa_convert.errors import GQAConvertError
from gqa_convert.io.gguf_header import read_gguf_header


def is_gguf(path: str | Path) -> bool:
    return Path(path).suffix == ".gguf" and Path(path).is_file()


def _require_gguf() -> None:
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise GQAConvertError("GGUF input needs the gguf package: pip install gguf") from None


def gguf_config(path: Path) -> Any:
    """The transformers config transformers derives from the GGUF metadata, once the header is read
    and every tensor's data lies within the file (a truncated download is refused in one line)."""
    _require_gguf()
    read_gguf_header(path)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as error:  # transformers raises several types for unreadable GGUF metadata
        raise GQAConvertError(f"{path} could not be read as GGUF: {error}") from None


def load_gguf_model(path: Path, config: Any = None, dtype: torch.dtype = torch.float32) -> Any:
    """The whole model, dequantized into memory (GGUF files hold small, quantized models)."""
    from transformers import AutoModelForCausalLM, GgufConfig

    config = config if config is not None else gguf_config(path)
    read_gguf_header(path)  # the file may have changed since its config was read
    try:
        return AutoModelForCausalLM.from_pretrained(
            path.parent,
            gguf_file=path.name,
            config=config,
            quantization_config=GgufConfig(dequantize=True),
            dtype=dtype,
        )
    except Exception as error:  # transformers raises several types for unsupported tensors
        raise GQAConvertError(f"{path} could not be loaded as a model: {error}") from None


def gguf_tokenizer(path: Path) -> Any:
    _require_gguf()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    except Exception as error:  # transformers raises several types for unsupported tokenizers
        raise GQAConvertError(f"the tokenizer of {path} could not be read: {error}") from None
