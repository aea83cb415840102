"""Perplexity: the text tokenized as one string (no special tokens), cut into non-overlapping windows of
seq_len tokens, exp(mean negative log-likelihood over every predicted position)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gqa_convert.arch import check_seq_len
from gqa_convert.data.text import read_text, tokenize_text
from gqa_convert.evaluation.loading import EVAL_DTYPES, load_eval_model
from gqa_convert.io.sources import load_tokenizer, model_config
from gqa_convert.options import Options, option

IGNORE_INDEX = -100  # labels that no loss counts


@torch.no_grad()
def perplexity_of(
    model: Any, ids: torch.Tensor, seq_len: int, batch_size: int = 4, accelerator: Any = None
) -> dict[str, float]:
    """Full windows are shared out over the accelerator's processes, each running the same number
    of forwards (padding windows count zero), as sharded models require; the shorter tail window is
    run everywhere and counted once. Returns perplexity, nll and the number of predicted tokens."""
    full = len(ids) // seq_len
    windows = list(ids[: full * seq_len].view(full, seq_len)) if full else []
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    per_rank = math.ceil(len(windows) / world)
    mine = [
        (windows[i], 1.0) if i < len(windows) else (windows[0], 0.0)
        for i in range(rank * per_rank, (rank + 1) * per_rank)
    ]
    batches = [mine[start : start + batch_size] for start in range(0, len(mine), batch_size)]
    tail = ids[full * seq_len :]
    if len(tail) >= 2:
        batches.append([(tail, 1.0 if rank == 0 else 0.0)])
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll_sum = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.float64, device=device)
    for batch in batches:
        inputs = torch.stack([window for window, _ in batch]).to(device)
        labels = inputs.clone()
        labels[torch.tensor([weight == 0 for _, weight in batch], device=device)] = IGNORE_INDEX
        # the model's own loss (mean over labelled positions): a training wrapper computes it without
        # full-vocabulary logits; every rank runs every forward, as sharded models require
        loss = model(input_ids=inputs, labels=labels).loss
        predicted = (labels[:, 1:] != IGNORE_INDEX).sum()
        if predicted > 0:
            nll_sum += loss.double() * predicted
        count += predicted
    if accelerator is not None:
        nll_sum, count = accelerator.reduce(nll_sum, "sum"), accelerator.reduce(count, "sum")
    model.train(was_training)
    mean_nll = (nll_sum / count).item()
    return {"perplexity": math.exp(mean_nll), "nll": mean_nll, "tokens": int(count.item())}


@dataclass(frozen=True, kw_only=True)
class EvalOptions(Options):
    seq_len: int = option(2048, help="window length", min=2)
    max_tokens: int | None = option(None, help="use only the first N tokens", min=2)
    text_column: str = option("text", help="text column of table data")
    batch_size: int = option(4, help="windows (or task requests) per forward", min=1)
    device: str | None = option(None, help="default: cuda when available, else cpu", cli=False)
    dtype: str = option("auto", help="auto: the checkpoint's dtype on a GPU, float32 on a CPU", choices=EVAL_DTYPES)


def evaluate(model_path: str | Path, data: str | Path, options: EvalOptions | None = None) -> dict[str, Any]:
    """Load a transformers folder (or a .gguf file) and its tokenizer, and measure perplexity on `data`."""
    options = options or EvalOptions()
    config = model_config(model_path)
    check_seq_len(options.seq_len, config)
    text = read_text(data, options.text_column)
    tokenizer = load_tokenizer(model_path)  # checked against the model by load_eval_model
    ids = tokenize_text(tokenizer, text, options.max_tokens)
    loaded = load_eval_model(model_path, options.dtype, options.device, config, tokenizer)
    result = perplexity_of(loaded.model, ids, options.seq_len, options.batch_size)
    return {
        "model": str(model_path),
        "data": str(data),
        "seq_len": options.seq_len,
        "dtype": str(loaded.dtype).removeprefix("torch."),
        "device": loaded.device,
        **result,
    }
