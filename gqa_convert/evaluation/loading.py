"""The model as every evaluation sees it: a transformers folder or a .gguf file (dequantized) loaded
through gqa-convert's own loader, on one device, in the dtype the same rule picks for every command."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gqa_convert.io.sources import load_causal_lm, load_tokenizer, model_config
from gqa_convert.io.vocabulary import check_ids_fit, check_tokenizer_fits, config_vocab_size

EVAL_DTYPES = ("auto", "float32", "bfloat16", "float16")


def default_device(device: str | None) -> str:
    """The device asked for, else cuda when available, else cpu."""
    return device or ("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype(setting: str, config: Any, device: str) -> torch.dtype:
    """auto: the dtype the model's config declares, on a GPU; float32 on a CPU, where half precision
    is slow and less exact (and a GGUF, dequantized, declares none)."""
    if setting != "auto":
        return getattr(torch, setting)
    declared = getattr(config, "dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared.removeprefix("torch."), None)
    usable = isinstance(declared, torch.dtype) and declared.is_floating_point
    return declared if device.startswith("cuda") and usable else torch.float32


def check_vocabulary(source: str | Path, tokenizer: Any, config: Any, special_tokens: bool = False) -> None:
    """Every id the tokenizer can give must have an embedding row (io.vocabulary), and, with
    `special_tokens`, the BOS/EOS/padding ids an evaluation may insert; checked before any forward pass."""
    check_tokenizer_fits(tokenizer, config, source)
    if special_tokens:
        for name in ("bos", "eos", "pad"):
            token_id = getattr(tokenizer, f"{name}_token_id", None)
            if isinstance(token_id, int):
                check_ids_fit(token_id, config_vocab_size(config), f"the {name} token of {source}'s tokenizer", source)


@dataclass(frozen=True)
class EvalModel:
    """A model ready to evaluate, with what was decided about it."""

    model: Any  # transformers PreTrainedModel, in eval mode, on `device`
    tokenizer: Any
    config: Any
    dtype: torch.dtype
    device: str


def load_eval_model(
    source: str | Path,
    dtype: str = "auto",
    device: str | None = None,
    config: Any = None,
    tokenizer: Any = None,
    special_tokens: bool = False,
) -> EvalModel:
    """Check the model (folder or .gguf), load its tokenizer, then its weights in the chosen dtype on
    the chosen device. `config`, `tokenizer`: those of the model when the caller has them already;
    `special_tokens`: the evaluation inserts BOS/EOS/padding ids (see check_vocabulary)."""
    from transformers.utils import logging as transformers_logging

    config = config if config is not None else model_config(source)
    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(source)
    check_vocabulary(source, tokenizer, config, special_tokens)
    transformers_logging.disable_progress_bar()
    device = default_device(device)
    torch_dtype = compute_dtype(dtype, config, device)
    model = load_causal_lm(source, dtype=torch_dtype).to(device).eval()
    return EvalModel(model=model, tokenizer=tokenizer, config=config, dtype=torch_dtype, device=device)
