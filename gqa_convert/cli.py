"""The `gqa-convert` command: each subcommand parses, validates and calls one library function."""

from __future__ import annotations

import enum
import functools
import json
import logging
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Optional

import typer

from gqa_convert.errors import GQAConvertError
from gqa_convert.grouping import GROUPINGS
from gqa_convert.merging import METHODS

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Convert multi-head attention checkpoints to grouped-query attention, and recover them.")  # fmt: skip

Method = enum.Enum("Method", {name: name for name in METHODS}, type=str)
Grouping = enum.Enum("Grouping", {name: name for name in GROUPINGS}, type=str)
DType = enum.Enum("DType", {name: name for name in ("auto", "float32", "bfloat16", "float16")}, type=str)


def _user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input: one line on stderr and exit 2, no traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        warnings.formatwarning = lambda message, category, *rest: f"warning: {message}\n"
        try:
            return command(*args, **kwargs)
        except GQAConvertError as error:
            typer.echo(f"error: {error}", err=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            typer.echo("interrupted; nothing was written to the output folder", err=True)
            raise typer.Exit(130) from None

    return wrapper


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("transformers").setLevel(logging.ERROR)


@app.command()
@_user_errors
def inspect(
    source: str = typer.Argument(..., help="model folder, .gguf file or Hub id"),
    seq_len: int = typer.Option(4096, help="sequence length for the KV-cache totals"),
    batch: int = typer.Option(1, help="batch size for the KV-cache totals"),
    cache_dtype: str = typer.Option("auto", help="auto (the checkpoint's dtype), float32, bfloat16, float16, float8"),
    revision: Optional[str] = typer.Option(None, help="Hub revision"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="read .bin (pickle) weights"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """What a checkpoint is, and its KV-cache bytes per token at every reachable kv head count."""
    from gqa_convert.report import CACHE_DTYPES, format_inspect, inspect_checkpoint

    if cache_dtype != "auto" and cache_dtype not in CACHE_DTYPES:
        raise GQAConvertError(f"--cache-dtype {cache_dtype}: choose auto or one of {', '.join(CACHE_DTYPES)}")
    _quiet_libraries()
    report = inspect_checkpoint(source, seq_len, batch, cache_dtype, revision, allow_pickle)
    typer.echo(json.dumps(report) if as_json else format_inspect(report))


@app.command()
@_user_errors
def pool(
    source: str = typer.Argument(..., help="model folder, .gguf file or Hub id"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (created)"),
    kv_heads: int = typer.Option(..., "--kv-heads", "-g", help="kv heads after pooling (1 = MQA)"),
    method: Method = typer.Option("mean", help="how a group's heads merge"),
    grouping: Grouping = typer.Option("contiguous", help="which heads form a group"),
    dtype: DType = typer.Option("auto", help="output dtype of floating tensors"),
    max_shard_size: str = typer.Option("5GB", help="largest safetensors shard"),
    seed: int = typer.Option(0, help="seed for --method random"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty output folder"),
    revision: Optional[str] = typer.Option(None, help="Hub revision"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="read .bin (pickle) weights"),
) -> None:
    """Group the query heads and merge each group's K/V projections (MHA/GQA -> GQA/MQA)."""
    from gqa_convert.convert import pool as run_pool

    _quiet_libraries()
    result = run_pool(source, out, kv_heads, method.value, grouping.value, dtype.value, max_shard_size, force,
                      seed, revision, allow_pickle)  # fmt: skip
    _summary(result)


@app.command()
@_user_errors
def expand(
    source: str = typer.Argument(..., help="model folder, .gguf file or Hub id"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (created)"),
    dtype: DType = typer.Option("auto", help="output dtype of floating tensors"),
    max_shard_size: str = typer.Option("5GB", help="largest safetensors shard"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty output folder"),
    revision: Optional[str] = typer.Option(None, help="Hub revision"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="read .bin (pickle) weights"),
) -> None:
    """Exact GQA/MQA -> MHA: repeat each kv head for the query heads that read it."""
    from gqa_convert.convert import expand as run_expand

    _quiet_libraries()
    _summary(run_expand(source, out, dtype.value, max_shard_size, force, revision, allow_pickle))


def _summary(result: Any) -> None:
    change = result.kv_bytes_per_token_after / result.kv_bytes_per_token_before - 1
    typer.echo(
        f"wrote {result.out}: kv heads {result.old_kv} -> {result.new_kv} ({result.num_heads} query heads), "
        f"KV cache {result.kv_bytes_per_token_before} -> {result.kv_bytes_per_token_after} bytes/token "
        f"at bf16 ({change:+.1%})"
    )


def main() -> None:
    app()


if __name__ == "__main__":
    sys.exit(main())
