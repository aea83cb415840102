"""inspect: what a checkpoint is and what its KV cache costs at every reachable kv head count.
Reads config and tensor headers only."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from gqa_convert.arch import (
    architecture_for,
    check_head_counts,
    head_dim_of,
    kv_cache_bytes_per_token,
    kv_heads_of,
    valid_kv_heads,
)
from gqa_convert.io.gguf import is_gguf
from gqa_convert.io.gguf_header import gguf_metadata
from gqa_convert.io.sources import open_checkpoint
from gqa_convert.options import Options, option
from gqa_convert.units import human_bytes

CACHE_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}


@dataclass(frozen=True, kw_only=True)
class InspectOptions(Options):
    seq_len: int = option(4096, help="sequence length for the KV-cache totals", min=1)
    batch: int = option(1, help="batch size for the KV-cache totals", min=1)
    cache_dtype: str = option(
        "auto", help="dtype of the cache (auto: the checkpoint's)", choices=("auto", *CACHE_DTYPES)
    )
    revision: str | None = option(None, help="Hub revision (branch, tag or commit) of a Hub id")
    allow_pickle: bool = option(False, help="read .bin (pickle) weights, with torch.load(weights_only=True)")


def _gguf_summary(path: Path) -> tuple[Any, Any, int, str]:
    """From the GGUF header: a config with the attention figures (all a GGUF file can say)."""
    meta = gguf_metadata(path)
    arch = architecture_for({"model_type": meta["model_type"]})
    kv_heads = meta["num_key_value_heads"]
    # GGUF stores falcon in its grouped layout whatever the count: the new decoder layout
    config = SimpleNamespace(**meta, num_kv_heads=kv_heads, new_decoder_architecture=True, multi_query=False)
    check_head_counts(config, arch)
    return config, arch, meta["parameters"], f"gguf {meta['main_type']}"


def _summary(source: str | Path, options: InspectOptions) -> tuple[Any, Any, int, str]:
    """Config, architecture row, parameter count and main dtype, from headers only."""
    path = Path(source)
    if is_gguf(path):
        return _gguf_summary(path)
    checkpoint = open_checkpoint(source, revision=options.revision, allow_pickle=options.allow_pickle)
    parameters = sum(info.nbytes // info.dtype.itemsize for info in checkpoint.tensors.values())
    by_bytes: Counter[str] = Counter()
    for info in checkpoint.tensors.values():
        by_bytes[str(info.dtype).removeprefix("torch.")] += info.nbytes
    dtype = by_bytes.most_common(1)[0][0] if by_bytes else "unknown"
    return checkpoint.config, checkpoint.architecture, parameters, dtype


def inspect_checkpoint(source: str | Path, options: InspectOptions | None = None) -> dict[str, Any]:
    """Architecture, sizes and a KV-cache table for every reachable kv head count. Headers only."""
    options = options or InspectOptions()
    config, arch, parameters, dtype = _summary(source, options)
    cache_dtype = options.cache_dtype
    if cache_dtype == "auto":  # the cache is kept in the dtype the model runs in
        cache_dtype = dtype if dtype in CACHE_DTYPES else "float32"
    element = CACHE_DTYPES[cache_dtype]
    num_heads, kv_heads = int(config.num_attention_heads), kv_heads_of(config, arch)
    mha = kv_cache_bytes_per_token(config, num_heads, element)
    reachable = valid_kv_heads(kv_heads)
    table = []
    for g in sorted(set(reachable) | {num_heads}, reverse=True):
        per_token = kv_cache_bytes_per_token(config, g, element)
        table.append(
            {
                "kv_heads": g,
                "bytes_per_token": per_token,
                "bytes_total": per_token * options.seq_len * options.batch,
                "saving_vs_mha": 1 - per_token / mha,
                "current": g == kv_heads,
                "reachable": g in reachable,
            }
        )
    return {
        "source": str(source),
        "architecture": arch.model_type,
        "layers": int(config.num_hidden_layers),
        "hidden_size": int(config.hidden_size),
        "num_attention_heads": num_heads,
        "num_key_value_heads": kv_heads,
        "head_dim": head_dim_of(config),
        "parameters": parameters,
        "dtype": dtype,
        "cache_dtype": cache_dtype,
        "seq_len": options.seq_len,
        "batch": options.batch,
        "kv_cache": table,
    }


def format_inspect(report: dict[str, Any]) -> str:
    heads, kv = report["num_attention_heads"], report["num_key_value_heads"]
    kind = "MHA" if kv == heads else ("MQA" if kv == 1 else "GQA")
    lines = [
        f"source        {report['source']}",
        f"architecture  {report['architecture']} ({kind})",
        f"layers {report['layers']}, hidden {report['hidden_size']}, heads {heads}, "
        f"kv heads {kv}, head_dim {report['head_dim']}",
        f"parameters    {report['parameters'] / 1e6:,.1f} M ({report['dtype']})",
        "",
        f"KV cache ({report['cache_dtype']}, seq {report['seq_len']} x batch {report['batch']}):",
        f"{'kv heads':>9}  {'per token':>12}  {'total':>12}  {'vs MHA':>7}",
    ]
    mha_bytes = report["kv_cache"][0]["bytes_per_token"]  # the table starts at MHA
    for row in report["kv_cache"]:
        mark = " <- now" if row["current"] else ("" if row["reachable"] else " (expand first)")
        lines.append(
            f"{row['kv_heads']:>9}  {human_bytes(row['bytes_per_token']):>12}  {human_bytes(row['bytes_total']):>12}"
            f"  {row['bytes_per_token'] / mha_bytes - 1:>+7.1%}{mark}"
        )
    return "\n".join(lines)
