"""Calibration text the source model writes itself, for users who have none of their own.

The source model samples sequences from a few neutral openings (the beginning-of-sequence token, or the
model's chat template around a request for some kind of text), batched, with a seeded generator: the
quantization literature (LLM-QAT, "data-free" calibration) uses such self-generated data because it
follows the model's own distribution rather than one domain's. Sequences do not stop at the end-of-text
token: the model starts a new document after it, as in its training data.

The whole source model runs here (through transformers, from the tensors our loader reads), so it must
fit the device's memory; the KV cache is bounded by choosing the batch size, and the number of tokens by
the caller.
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from gqa_convert.arch import kv_cache_bytes_per_token
from gqa_convert.errors import GQAConvertError
from gqa_convert.io.sources import Checkpoint
from gqa_convert.io.vocabulary import largest_token_id

# Requests for the chat openings: kinds of text, no subject (the model chooses one).
CHAT_REQUESTS = (
    "Write an encyclopedia article about a subject of your choice.",
    "Tell me a story.",
    "Explain in detail how something works.",
    "Write a short program and explain what it does.",
    "Write a news report.",
    "Write a letter to a friend.",
    "Describe a period of history.",
    "Write step-by-step instructions for a task.",
    "Write an essay that argues for an opinion.",
    "Write a conversation between two people.",
    "Summarize a scientific topic for a student.",
    "Write a product review.",
)
KV_CACHE_BYTES = {"cpu": 1 << 30, "cuda": 8 << 30}  # the generation's KV cache, at most (bytes, per device type)
MAX_BATCH = 64  # sequences sampled together, at most


RECIPE_FILE_FIX = "set calibration.openings to {} in a recipe file (gqa-convert recipes aligned-self > r.yaml)"
TEXT_FIX = "calibrate on your text instead (--recipe aligned --calib-data FILE)"


def _start_token(tokenizer: Any) -> int | None:
    first = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    return None if first is None else int(first)


def _has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _first(tokenizer: Any) -> int:
    first = _start_token(tokenizer)
    if first is None:
        fix = RECIPE_FILE_FIX.format("chat") if _has_chat_template(tokenizer) else TEXT_FIX
        raise GQAConvertError(f"the tokenizer has no beginning- or end-of-text token to start from: {fix}")
    return first


def _bos(tokenizer: Any, rows: int, generator: torch.Generator) -> list[list[int]]:
    return [[_first(tokenizer)]] * rows


def _random(tokenizer: Any, rows: int, generator: torch.Generator) -> list[list[int]]:
    """The beginning-of-text token, then one token drawn uniformly from the vocabulary (not a special
    one), as LLM-QAT starts its generations: every sequence starts somewhere else."""
    special = set(tokenizer.all_special_ids)
    ordinary = torch.tensor(sorted(set(tokenizer.get_vocab().values()) - special))
    drawn = ordinary[torch.randint(len(ordinary), (rows,), generator=generator)]
    return [[_first(tokenizer), int(token)] for token in drawn]


def _chat(tokenizer: Any, rows: int, generator: torch.Generator) -> list[list[int]]:
    if not _has_chat_template(tokenizer):
        fix = RECIPE_FILE_FIX.format("bos or random") if _start_token(tokenizer) is not None else TEXT_FIX
        raise GQAConvertError(f"the tokenizer has no chat template for the chat openings: {fix}")
    prompts = []
    for request in CHAT_REQUESTS:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": request}], add_generation_prompt=True, tokenize=True, return_dict=False
        )
        prompts.append([int(i) for i in (ids["input_ids"] if isinstance(ids, dict) else ids)])
    return [prompts[row % len(prompts)] for row in range(rows)]


def _auto(tokenizer: Any, rows: int, generator: torch.Generator) -> list[list[int]]:
    """Chat openings and random ones alternately where the tokenizer has a chat template, else random;
    chat only (with a warning) where it has no beginning- or end-of-text token to start random ones from."""
    if not _has_chat_template(tokenizer):
        return _random(tokenizer, rows, generator)
    if _start_token(tokenizer) is None:
        warnings.warn(
            "the tokenizer has no beginning- or end-of-text token: the auto openings are all chat openings",
            stacklevel=2,
        )
        return _chat(tokenizer, rows, generator)
    chats, randoms = _chat(tokenizer, (rows + 1) // 2, generator), _random(tokenizer, rows // 2, generator)
    return [(chats if row % 2 == 0 else randoms)[row // 2] for row in range(rows)]


# openings -> (tokenizer, sequences, generator) -> the token ids each sequence starts from
OPENINGS: dict[str, Callable[[Any, int, torch.Generator], list[list[int]]]] = {
    "bos": _bos,
    "random": _random,
    "chat": _chat,
    "auto": _auto,
}


@dataclass(frozen=True)
class Generation:
    """How the source model writes its calibration text (the recipe's calibration section: openings,
    temperature, top_p, seed; checked there)."""

    openings: str = "auto"
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int = 0


def _draw(logits: torch.Tensor, settings: Generation, generator: torch.Generator) -> torch.Tensor:
    """One token per row from the logits (rows, vocab), on the CPU: the same draws on any device. In
    float64 and from the logits less their maximum, so that any temperature above 0, however small,
    gives a distribution (the top token's weight is exp(0) = 1), never inf/inf."""
    logits = logits.double().cpu()
    probs = torch.softmax((logits - logits.amax(-1, keepdim=True)) / settings.temperature, dim=-1)
    if settings.top_p < 1:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        outside = sorted_probs.cumsum(-1) - sorted_probs >= settings.top_p  # the mass before it already covers p
        probs = probs.scatter(-1, order, sorted_probs.masked_fill(outside, 0.0))
    # inverse-CDF sampling: one uniform draw per row (torch.multinomial draws one per vocabulary entry,
    # the largest cost of writing on a CPU); a token of zero probability has an empty interval
    cdf = probs.cumsum(dim=-1)
    if not torch.isfinite(cdf[:, -1]).all():
        raise GQAConvertError(
            "the source model's next-token scores are not finite (nan or inf): check its weights, or calibrate "
            "on your own text (--recipe aligned --calib-data TEXT)"
        )
    point = torch.rand(len(probs), 1, generator=generator, dtype=cdf.dtype) * cdf[:, -1:]
    return torch.searchsorted(cdf, point, right=True)[:, 0].clamp_max(probs.shape[-1] - 1)


def _check_openings(prompts: list[list[int]], seq_len: int) -> int:
    """The longest opening's length, which must leave room for the model to write in every window."""
    width = max(len(p) for p in prompts)
    if width >= seq_len:
        raise GQAConvertError(
            f"the openings are up to {width} tokens long, which leaves nothing to write in sequences of "
            f"{seq_len} tokens: raise --calib-seq-len (and the recipe's calibration.document_tokens) above "
            f"{width}, or " + RECIPE_FILE_FIX.format("bos or random")
        )
    return width


@torch.no_grad()
def sample(
    model: Any,
    prompts: list[list[int]],
    seq_len: int,
    settings: Generation,
    generator: torch.Generator,
    on_step: Callable[[], None] | None = None,
    vocab: int | None = None,
) -> torch.Tensor:
    """(len(prompts), seq_len) token ids: each prompt followed by the model's samples (one batch; the
    prompts are left-padded, positions counted from each one's first token), drawn with `generator` (a
    CPU generator) among the first `vocab` ids (the tokenizer's: not the rows a model's embedding is
    padded with). `on_step()` after each token written to every row."""
    device = next(model.parameters()).device
    width = _check_openings(prompts, seq_len)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros(len(prompts), width, dtype=torch.long)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt) :] = torch.tensor(prompt)
        mask[row, width - len(prompt) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    # transformers 5 names the KV cache `cache`, earlier versions `past_key_values`
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    steps = seq_len - min(len(p) for p in prompts)
    inputs, cache, written = ids, None, []
    for _ in range(steps):
        output = model(
            input_ids=inputs.to(device),
            attention_mask=mask.to(device),
            position_ids=positions.to(device),
            use_cache=True,
            logits_to_keep=1,
            **{cache_name: cache},
        )
        cache = output[cache_name]
        token = _draw(output.logits[:, -1, :vocab], settings, generator)
        written.append(token)
        inputs, positions = token[:, None], positions[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(len(prompts), 1, dtype=torch.long)], dim=1)
        if on_step is not None:
            on_step()
    generated = torch.stack(written, dim=1)
    return torch.stack([torch.cat([torch.tensor(p), generated[row]])[:seq_len] for row, p in enumerate(prompts)])


def generation_dtype(device: str) -> torch.dtype:
    """bfloat16 on a GPU that has it; float32 elsewhere."""
    if device.startswith("cuda") and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def _available_bytes(device: str) -> int | None:
    if device.startswith("cuda"):
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None  # not known here: not checked


def source_model(checkpoint: Checkpoint, device: str, dtype: torch.dtype) -> Any:
    """The whole source model on `device`, built by transformers from the checkpoint's config and loaded
    from the tensors our loader reads (one at a time), or an error naming the fix when it cannot fit."""
    from transformers import AutoModelForCausalLM

    parameters = sum(math.prod(info.shape) for info in checkpoint.tensors.values())
    need, available = parameters * dtype.itemsize, _available_bytes(device)
    if available is not None and need > 0.8 * available:
        cpu_need, cpu_available = parameters * generation_dtype("cpu").itemsize, _available_bytes("cpu")
        on_cpu = device.startswith("cuda") and (cpu_available is None or cpu_need <= 0.8 * cpu_available)
        fix = "write it on the CPU (--device cpu; slower), " if on_cpu else ""
        raise GQAConvertError(
            f"self-generated calibration runs the whole source model ({need / 2**30:.1f} GiB in "
            f"{str(dtype).removeprefix('torch.')}) on {device}, which has {available / 2**30:.1f} GiB free: {fix}"
            f"{TEXT_FIX.replace(' instead', '')}, or use --recipe mean"
        )
    config = copy.deepcopy(checkpoint.config)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    own = dict(model.named_parameters(remove_duplicate=False)) | dict(model.named_buffers())
    loaded = set()
    for name in checkpoint.tensors:
        if name not in own or own[name].shape != checkpoint.tensors[name].shape:
            raise GQAConvertError(f"{checkpoint.source}: tensor '{name}' does not fit the model transformers builds")
        with torch.no_grad():
            own[name].copy_(checkpoint.get(name))
        loaded.add(own[name].data_ptr())
    missing = [name for name, p in model.named_parameters(remove_duplicate=False) if p.data_ptr() not in loaded]
    if missing:
        raise GQAConvertError(f"{checkpoint.source} lacks tensors the model needs: {', '.join(missing[:3])}")
    return model.eval()


def batch_size(config: Any, kv_heads: int, seq_len: int, dtype: torch.dtype, device: str) -> int:
    """Sequences per batch such that their KV cache stays within KV_CACHE_BYTES."""
    per_row = kv_cache_bytes_per_token(config, kv_heads, dtype.itemsize) * seq_len
    budget = KV_CACHE_BYTES["cuda" if device.startswith("cuda") else "cpu"]
    return max(1, min(MAX_BATCH, budget // max(per_row, 1)))


def self_generate(
    checkpoint: Checkpoint,
    rows: int,
    seq_len: int,
    settings: Generation,
    device: str = "cpu",
    log: Callable[[str], None] | None = None,
) -> torch.Tensor:
    """(rows, seq_len) token ids the source model writes, batch after batch (the same ids for the same
    settings, model and device), with a progress bar over the tokens."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    if rows < 1 or seq_len < 2:
        raise GQAConvertError("self-generated calibration needs at least one sequence of 2 tokens or more")
    generator = torch.Generator().manual_seed(settings.seed)  # one stream of draws: openings, then every batch
    tokenizer = checkpoint.tokenizer(check_vocab=True)  # its ids enter the model
    openings = OPENINGS[settings.openings](tokenizer, rows, generator)
    _check_openings(openings, seq_len)  # before the model is loaded
    vocab = largest_token_id(tokenizer) + 1
    dtype = generation_dtype(device)
    model = source_model(checkpoint, device, dtype)
    size = batch_size(checkpoint.config, checkpoint.kv_heads(), seq_len, dtype, device)
    columns = (TextColumn("writing calibration text"), BarColumn(), MofNCompleteColumn(), TextColumn("tokens"))
    parts = []
    with Progress(*columns, TimeRemainingColumn()) as progress:
        task = progress.add_task("generate", total=rows * seq_len)
        for start in range(0, rows, size):
            count = min(size, rows - start)
            prompts = openings[start : start + count]
            parts.append(
                sample(model, prompts, seq_len, settings, generator, lambda n=count: progress.advance(task, n), vocab)
            )
            progress.update(task, completed=(start + count) * seq_len)
    del model
    return torch.cat(parts)
