"""What a checkpoint is and what its KV cache costs (inspect), and what a conversion did (provenance
file and model card written beside the weights)."""

from __future__ import annotations

import datetime as dt
import json
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from gqa_convert import __version__
from gqa_convert.architectures import head_dim_of, kv_heads_of

CACHE_DTYPES = {"float32": 4, "bfloat16": 2, "float16": 2, "float8": 1}


def kv_cache_bytes_per_token(config: Any, kv_heads: int, bytes_per_element: int = 2) -> int:
    """2 (K and V) x kv heads x head_dim x layers x bytes per element."""
    return 2 * kv_heads * head_dim_of(config) * int(config.num_hidden_layers) * bytes_per_element


def inspect_checkpoint(source: str | Path, seq_len: int = 4096, batch: int = 1, cache_dtype: str = "auto",
                       revision: str | None = None, allow_pickle: bool = False) -> dict[str, Any]:  # fmt: skip
    """Architecture, sizes and a KV-cache table for every reachable kv head count. Headers only."""
    from gqa_convert.checkpoint import open_checkpoint, read_gguf_summary
    from gqa_convert.convert import valid_kv_heads

    if seq_len <= 0 or batch <= 0:
        from gqa_convert.errors import GQAConvertError

        raise GQAConvertError("--seq-len and --batch must be positive")
    path = Path(source)
    if path.is_file() and path.suffix == ".gguf":
        config, arch, parameters, dtype = read_gguf_summary(path)
    else:
        checkpoint = open_checkpoint(source, revision=revision, allow_pickle=allow_pickle)
        config, arch = checkpoint.config, checkpoint.architecture
        parameters = sum(info.nbytes // info.dtype.itemsize for info in checkpoint.tensors.values())
        by_bytes: Counter[str] = Counter()
        for info in checkpoint.tensors.values():
            by_bytes[str(info.dtype).removeprefix("torch.")] += info.nbytes
        dtype = by_bytes.most_common(1)[0][0] if by_bytes else "unknown"
    if cache_dtype == "auto":  # the cache is kept in the dtype the model runs in
        cache_dtype = dtype if dtype in CACHE_DTYPES else "float32"
    element = CACHE_DTYPES[cache_dtype]
    num_heads, kv_heads = int(config.num_attention_heads), kv_heads_of(config, arch)
    mha = kv_cache_bytes_per_token(config, num_heads, element)
    table = []
    for g in sorted(set(valid_kv_heads(num_heads, kv_heads)) | {num_heads}, reverse=True):
        per_token = kv_cache_bytes_per_token(config, g, element)
        table.append({
            "kv_heads": g,
            "bytes_per_token": per_token,
            "bytes_total": per_token * seq_len * batch,
            "saving_vs_mha": 1 - per_token / mha,
            "current": g == kv_heads,
            "reachable": g in valid_kv_heads(num_heads, kv_heads),
        })  # fmt: skip
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
        "seq_len": seq_len,
        "batch": batch,
        "kv_cache": table,
    }


def human_bytes(count: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(count) < 1024 or unit == "TiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.2f} {unit}"
        count /= 1024
    raise AssertionError("unreachable")


def format_inspect(report: dict[str, Any]) -> str:
    kind = "MHA" if report["num_key_value_heads"] == report["num_attention_heads"] else (
        "MQA" if report["num_key_value_heads"] == 1 else "GQA")  # fmt: skip
    lines = [
        f"source        {report['source']}",
        f"architecture  {report['architecture']} ({kind})",
        f"layers {report['layers']}, hidden {report['hidden_size']}, heads {report['num_attention_heads']}, "
        f"kv heads {report['num_key_value_heads']}, head_dim {report['head_dim']}",
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


def write_provenance(folder: Path, source: str, details: dict[str, Any]) -> None:
    record = {
        "tool": "gqa-convert",
        "version": __version__,
        "source": source,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "torch": torch.__version__,
        **details,
    }
    (folder / "gqa_convert.json").write_text(json.dumps(record, indent=2) + "\n")


def write_model_card(folder: Path, checkpoint: Any, details: dict[str, Any], before: int, after: int,
                     title: str) -> None:
    """A Hub-style README.md: YAML front matter, then what was done and what it saves."""
    base = checkpoint.source if not Path(checkpoint.source).exists() else Path(checkpoint.source).name
    operation = details["operation"]
    if operation == "pool":
        what = (f"The {details['kv_heads_before']} kv heads were merged into {details['kv_heads_after']} by "
                f"`{details['method']}` over `{details['grouping']}` groups {details['groups']}.")  # fmt: skip
        advice = ("Merging kv heads of a trained model loses quality until the model is uptrained "
                  "(`gqa-convert uptrain`); measure it with `gqa-convert eval`.")  # fmt: skip
    else:
        what = f"Each of the {details['kv_heads_before']} kv heads was copied to the query heads that read it."
        advice = "This conversion is exact: the model computes the same function as its source."
    card = f"""---
base_model: {base}
library_name: transformers
tags:
- gqa-convert
- grouped-query-attention
- {operation}
---

# {title}

Converted from `{base}` by gqa-convert {__version__} (`{operation}`).

{what}

| | kv heads | KV cache per token (bf16) |
|---|---|---|
| source | {details['kv_heads_before']} | {before} bytes |
| this model | {details['kv_heads_after']} | {after} bytes ({after / before - 1:+.1%}) |

{advice}

Provenance (tool version, method, groups, date) is in `gqa_convert.json`.
"""
    (folder / "README.md").write_text(card)
