"""bench: what a smaller KV cache buys at decode time. Each model is loaded in transformers in a fresh
process, prefilled with `seq_len` tokens per sequence, then decodes `new_tokens` greedily; the report
gives the bytes the cache object actually holds, peak memory, and prefill and decode speed."""

from __future__ import annotations

import inspect
import multiprocessing
import resource
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from gqa_convert.arch import architecture_for, check_seq_len, kv_heads_of
from gqa_convert.errors import GQAConvertError
from gqa_convert.evaluation import EVAL_DTYPES, compute_dtype
from gqa_convert.io.gguf import is_gguf
from gqa_convert.io.sources import check_model_folder
from gqa_convert.options import Options, option
from gqa_convert.units import human_bytes


@dataclass(frozen=True, kw_only=True)
class BenchOptions(Options):
    seq_len: int = option(2048, help="tokens per sequence before decoding (the context the cache holds)", min=1)
    batch: int = option(1, help="sequences decoded together", min=1)
    new_tokens: int = option(32, help="tokens decoded per sequence", min=1)
    dtype: str = option("auto", help="auto: the checkpoint's dtype on a GPU, float32 on a CPU", choices=EVAL_DTYPES)
    device: str | None = option(None, help="default: cuda when available, else cpu", cli=False)
    seed: int = option(0, help="seed of the prompt tokens", cli=False)


@dataclass(frozen=True)
class BenchResult:
    model: str
    kv_heads: int
    dtype: str
    device: str
    cache_bytes: int  # held by the cache object after prefill and decode
    cache_tokens: int  # positions the cache holds per sequence
    batch: int
    peak_memory_bytes: int  # GPU: peak allocated; CPU: peak resident set of the process
    prefill_s: float
    decode_tokens_per_s: float  # over the whole batch


def cache_tensors(cache: Any) -> list[torch.Tensor]:
    """Every tensor a transformers cache object holds (layered caches of 4.56+, or key/value lists)."""
    found: list[torch.Tensor] = []
    for layer in getattr(cache, "layers", None) or []:
        found += [value for value in vars(layer).values() if isinstance(value, torch.Tensor)]
    for name in ("key_cache", "value_cache"):
        found += [value for value in getattr(cache, name, None) or [] if isinstance(value, torch.Tensor)]
    unique = {tensor.data_ptr(): tensor for tensor in found if tensor.numel()}
    return list(unique.values())


def _peak_memory(device: str) -> int:
    if device.startswith("cuda"):
        return int(torch.cuda.max_memory_allocated(device))
    scale = 1 if sys.platform == "darwin" else 1024  # ru_maxrss: bytes on macOS, KiB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def _synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure(model_path: str, options: BenchOptions) -> BenchResult:
    """Prefill, then greedy decode, in this process (bench_models runs each in a fresh one)."""
    from transformers import AutoModelForCausalLM

    device = options.device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = compute_dtype(options.dtype, check_model_folder(Path(model_path)), device)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(device).eval()
    vocab = int(model.config.vocab_size)
    generator = torch.Generator().manual_seed(options.seed)
    ids = torch.randint(0, vocab, (options.batch, options.seq_len), generator=generator).to(device)
    _synchronize(device)
    started = time.perf_counter()
    output = model(input_ids=ids, use_cache=True)
    _synchronize(device)
    prefill = time.perf_counter() - started
    # transformers 5 names the cache argument and output `cache`; 4.x `past_key_values`
    cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache, token = output[cache_name], output.logits[:, -1:].argmax(-1)
    started = time.perf_counter()
    for _ in range(options.new_tokens):
        output = model(input_ids=token, use_cache=True, **{cache_name: cache})
        cache, token = output[cache_name], output.logits[:, -1:].argmax(-1)
    _synchronize(device)
    decode = time.perf_counter() - started
    held = cache_tensors(cache)
    return BenchResult(
        model=str(model_path),
        kv_heads=kv_heads_of(model.config, architecture_for(model.config.to_dict())),
        dtype=str(dtype).removeprefix("torch."),
        device=device,
        cache_bytes=sum(tensor.numel() * tensor.element_size() for tensor in held),
        cache_tokens=options.seq_len + options.new_tokens,
        batch=options.batch,
        peak_memory_bytes=_peak_memory(device),
        prefill_s=round(prefill, 4),
        decode_tokens_per_s=round(options.batch * options.new_tokens / decode, 2),
    )


def _child(model_path: str, options: BenchOptions, results: Any) -> None:
    from transformers.utils import logging as transformers_logging

    transformers_logging.set_verbosity_error()
    transformers_logging.disable_progress_bar()
    results.put(asdict(measure(model_path, options)))


def bench_models(models: list[str], options: BenchOptions | None = None) -> list[BenchResult]:
    """Each model measured in a fresh process, so peak memory is its own."""
    options = options or BenchOptions()
    if not models:
        raise GQAConvertError("give at least one model folder")
    for model in models:
        check_positions(options, check_model_folder(_transformers_folder(model)))
    context = multiprocessing.get_context("spawn")
    results = []
    for model in models:
        queue = context.Queue()
        process = context.Process(target=_child, args=(model, options, queue))
        process.start()
        process.join()
        if process.exitcode != 0 or queue.empty():
            raise GQAConvertError(f"benchmarking {model} failed (exit code {process.exitcode}); see the messages above")
        results.append(BenchResult(**queue.get()))
    return results


def _transformers_folder(model: str) -> Path:
    if is_gguf(Path(model)):
        raise GQAConvertError(
            f"{model} is a GGUF file and bench measures transformers folders: convert it first "
            f"(gqa-convert pool {model} -o FOLDER --kv-heads N), or measure it with llama.cpp's llama-bench"
        )
    return Path(model)


def check_positions(options: BenchOptions, config: Any) -> None:
    """The prompt and the decoded tokens together must fit the model's positions."""
    check_seq_len(options.seq_len, config)
    positions = getattr(config, "max_position_embeddings", None)
    needed = options.seq_len + options.new_tokens
    if positions is not None and needed > positions:
        raise GQAConvertError(
            f"--seq-len {options.seq_len} plus --new-tokens {options.new_tokens} is {needed} positions, above the "
            f"model's {positions}: lower --seq-len or --new-tokens"
        )


def format_bench(results: list[BenchResult]) -> str:
    header = f"{'model':<28} {'kv heads':>8} {'KV cache held':>14} {'per token':>11} {'peak memory':>12}"
    header += f" {'prefill s':>10} {'decode tok/s':>13}"
    lines = [header]
    for result in results:
        per_token = result.cache_bytes / (result.cache_tokens * result.batch)
        lines.append(
            f"{Path(result.model).name[:28]:<28} {result.kv_heads:>8} {human_bytes(result.cache_bytes):>14} "
            f"{human_bytes(per_token):>11} {human_bytes(result.peak_memory_bytes):>12} "
            f"{result.prefill_s:>10.2f} {result.decode_tokens_per_s:>13.1f}"
        )
    first = results[0]
    lines.append(
        f"({first.dtype} on {first.device}; batch {first.batch}, {first.cache_tokens} positions cached per sequence; "
        "peak memory: GPU allocated, or the process's resident set on a CPU)"
    )
    return "\n".join(lines)
