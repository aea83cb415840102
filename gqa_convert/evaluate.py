"""Perplexity: the text tokenized as one string (no special tokens), cut into non-overlapping windows of
seq_len tokens, exp(mean negative log-likelihood over every predicted position)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from gqa_convert.errors import GQAConvertError


def tokenize_text(tokenizer: Any, text: str, max_tokens: int | None = None) -> torch.Tensor:
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    if len(ids) < 2:
        raise GQAConvertError("the evaluation text has fewer than 2 tokens: give more text")
    return torch.tensor(ids, dtype=torch.long)


@torch.no_grad()
def perplexity_of(model: Any, ids: torch.Tensor, seq_len: int, batch_size: int = 4,
                  accelerator: Any = None) -> dict[str, float]:  # fmt: skip
    """Full windows are shared out over the accelerator's processes, each running the same number
    of forwards (padding windows count zero), as sharded models require; the shorter tail window is
    run everywhere and counted once. Returns perplexity, nll and the number of predicted tokens."""
    full = len(ids) // seq_len
    windows = list(ids[: full * seq_len].view(full, seq_len)) if full else []
    rank, world = (accelerator.process_index, accelerator.num_processes) if accelerator else (0, 1)
    per_rank = math.ceil(len(windows) / world)
    mine = [(windows[i], 1.0) if i < len(windows) else (windows[0], 0.0)
            for i in range(rank * per_rank, (rank + 1) * per_rank)]  # fmt: skip
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
        weights = torch.tensor([weight for _, weight in batch], dtype=torch.float64, device=device)
        logits = model(input_ids=inputs).logits[:, :-1].float()
        nll = F.cross_entropy(logits.transpose(1, 2), inputs[:, 1:], reduction="none").sum(1).double()
        nll_sum += (weights * nll).sum()
        count += weights.sum() * (inputs.shape[1] - 1)
    if accelerator is not None:
        nll_sum, count = accelerator.reduce(nll_sum, "sum"), accelerator.reduce(count, "sum")
    model.train(was_training)
    mean_nll = (nll_sum / count).item()
    return {"perplexity": math.exp(mean_nll), "nll": mean_nll, "tokens": int(count.item())}


def evaluate(model_path: str | Path, data: str | Path, seq_len: int = 2048, max_tokens: int | None = None,
             text_column: str = "text", batch_size: int = 4, device: str | None = None,
             dtype: str = "float32") -> dict[str, Any]:  # fmt: skip
    """Load a transformers folder and its tokenizer, and measure perplexity on `data`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as transformers_logging

    from gqa_convert.checkpoint import check_model_folder
    from gqa_convert.data import read_text

    if seq_len < 2:
        raise GQAConvertError("--seq-len must be at least 2")
    config = check_model_folder(Path(model_path))
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and seq_len > positions:
        raise GQAConvertError(f"--seq-len {seq_len} is above the model's {positions} positions: lower it")
    text = read_text(data, text_column)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    ids = tokenize_text(tokenizer, text, max_tokens)
    transformers_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype))
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    result = perplexity_of(model.to(device), ids, seq_len, batch_size)
    return {"model": str(model_path), "data": str(data), "seq_len": seq_len, **result}
