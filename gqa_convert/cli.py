"""The `gqa-convert` command: each subcommand parses its flags, builds the library's options (which
validate themselves) and calls one library function."""

from __future__ import annotations

import enum
import json
import sys
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import typer

from gqa_convert.benchmark import BenchOptions, bench_models, format_bench
from gqa_convert.command_line import OneLineErrors, takes, user_errors
from gqa_convert.data.tokenize import TokenizeOptions
from gqa_convert.data.tokenize import tokenize as run_tokenize
from gqa_convert.errors import GQAConvertError
from gqa_convert.evaluate import EvalOptions
from gqa_convert.evaluate import evaluate as run_evaluate
from gqa_convert.inspection import InspectOptions, format_inspect, inspect_checkpoint
from gqa_convert.planning.report import format_plan
from gqa_convert.report.recovery import plot_run
from gqa_convert.surgery.calibration.settings import KEY_MERGES, OUTPUT_RIDGES, REFINE_TARGETS, VALUE_MOMENTS
from gqa_convert.surgery.convert import expand as run_expand
from gqa_convert.surgery.convert import pool as run_pool
from gqa_convert.surgery.groupings import GROUPINGS
from gqa_convert.surgery.methods import METHODS
from gqa_convert.surgery.options import Calibration, ExpandOptions, PoolOptions
from gqa_convert.train.launch import uptrain as run_uptrain
from gqa_convert.train.settings import TrainSettings
from gqa_convert.units import DTYPE_NAMES

app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Convert multi-head attention checkpoints to grouped-query attention, and recover them.",
)

Method = enum.Enum("Method", {name: name for name in METHODS}, type=str)
Grouping = enum.Enum("Grouping", {name: name for name in GROUPINGS}, type=str)
DType = enum.Enum("DType", {name: name for name in DTYPE_NAMES}, type=str)
KeyMerge = enum.Enum("KeyMerge", {name: name for name in KEY_MERGES}, type=str)
ValueMoment = enum.Enum("ValueMoment", {name: name for name in VALUE_MOMENTS}, type=str)
RefineTarget = enum.Enum("RefineTarget", {name: name for name in REFINE_TARGETS}, type=str)
_METHOD_HELP = "how a group's heads merge: " + "; ".join(f"{m.name}: {m.help}" for m in METHODS.values())
_GROUPING_HELP = "which heads form a group: " + "; ".join(f"{g.name}: {g.help}" for g in GROUPINGS.values())
_LEFT_BY_INTERRUPTION = "nothing was written to the output folder"
SOURCE = typer.Argument(..., help="model folder, .gguf file or Hub id")
OUT = typer.Option(..., "--out", "-o", help="output folder (created)")


@app.command()
@user_errors()
@takes(InspectOptions)
def inspect(
    source: str = SOURCE,
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    options: InspectOptions = None,
) -> None:
    """What a checkpoint is, and its KV-cache bytes per token at every reachable kv head count."""
    report = inspect_checkpoint(source, options)
    typer.echo(json.dumps(report) if as_json else format_inspect(report))


def _calibration(flags: dict[str, Any]) -> Calibration | None:
    """pool's calibration flags as a Calibration (None without --calib-data)."""
    if (flags["refine_steps"] or flags["refine_target"]) and not flags["calib_data"]:
        raise GQAConvertError(
            "--refine-steps/--refine-target refine a calibrated merge: add --method aligned --calib-data FILE"
        )
    if not flags["calib_data"]:
        return None
    return Calibration(
        data=flags["calib_data"],
        extra_data=tuple(flags["calib_extra"] or ()),
        tokens=flags["calib_tokens"],
        seq_len=flags["calib_seq_len"],
        text_column=flags["calib_text_column"],
        sequential=flags["calib_sequential"],
        key_merge=flags["key_merge"].value,
        band_angle=flags["band_angle"],
        value_moment=flags["value_moment"].value,
        output_ridges=tuple(flags["output_ridge"] or OUTPUT_RIDGES) if flags["output_solve"] else None,
        device=flags["device"],
        refine_steps=flags["refine_steps"],
        refine_lr=flags["refine_lr"],
        refine_target=flags["refine_target"].value if flags["refine_target"] else None,
    )


@app.command()
@user_errors(_LEFT_BY_INTERRUPTION)
def pool(
    source: str = typer.Argument(..., help="model folder, .gguf file or Hub id"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder (created)"),
    kv_heads: int = typer.Option(..., "--kv-heads", "-g", help="kv heads after pooling (1 = MQA)"),
    method: Method = typer.Option("mean", help=_METHOD_HELP),
    grouping: Grouping = typer.Option("contiguous", help=_GROUPING_HELP),
    dtype: DType = typer.Option("auto", help="output dtype of floating tensors"),
    max_shard_size: str = typer.Option("5GB", help="largest safetensors shard"),
    seed: int = typer.Option(0, help="seed for --method random"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty output folder"),
    revision: Optional[str] = typer.Option(None, help="Hub revision"),
    allow_pickle: bool = typer.Option(False, "--allow-pickle", help="read .bin (pickle) weights"),
    calib_data: Optional[str] = typer.Option(None, help="calibration text for calibrated methods and groupings"),
    calib_extra: Optional[list[str]] = typer.Option(None, help="calibration text of other domains (repeatable)"),
    calib_tokens: int = typer.Option(16384, help="calibration tokens"),
    calib_seq_len: int = typer.Option(512, help="calibration sequence length (use the target context length)"),
    calib_text_column: str = typer.Option("text", help="text column of table calibration data"),
    calib_sequential: bool = typer.Option(True, help="calibrate each layer on the merged layers' outputs"),
    key_merge: KeyMerge = typer.Option("frequency", help="aligned K: frequency-aware (per layer) or complex per pair"),
    band_angle: float = typer.Option(1.0, help="aligned K: the low band's pairs rotate at most this (rad) per window"),
    value_moment: ValueMoment = typer.Option(
        "per-head", help="aligned V: the moments it fits (per-head attended, head-averaged attended, or plain)"
    ),
    output_solve: bool = typer.Option(True, help="aligned: solve all o_proj blocks jointly (held-out check)"),
    output_ridge: Optional[list[float]] = typer.Option(
        None, help="relative ridge of the o_proj solve (repeatable: the best per layer; default 0.1 0.3 1 3 10)"
    ),
    device: str = typer.Option("auto", help="calibration device: auto (cuda when available), cpu, cuda, cuda:N"),
    refine_steps: Optional[int] = typer.Option(
        None, help="aligned: Adam steps per layer fitting the merged attention (default: 100 on a GPU, 0 on a CPU)"
    ),
    refine_lr: float = typer.Option(3e-4, help="learning rate of --refine-steps"),
    refine_target: Optional[RefineTarget] = typer.Option(
        None, help="what --refine-steps fits: the decoder block's output (default, MLP included) or the attention's"
    ),
) -> None:
    """Group the query heads and merge each group's K/V projections (MHA/GQA -> GQA/MQA)."""
    calibration = _calibration(locals())
    options = PoolOptions(
        kv_heads=kv_heads,
        method=method.value,
        grouping=grouping.value,
        seed=seed,
        calibration=calibration,
        dtype=dtype.value,
        max_shard_size=max_shard_size,
        force=force,
        revision=revision,
        allow_pickle=allow_pickle,
    )
    _summary(run_pool(source, out, options))


@app.command()
@user_errors(_LEFT_BY_INTERRUPTION)
@takes(ExpandOptions)
def expand(source: str = SOURCE, out: Path = OUT, options: ExpandOptions = None) -> None:
    """Exact GQA/MQA -> MHA: repeat each kv head for the query heads that read it."""
    _summary(run_expand(source, out, options))


@app.command()
@user_errors("rerun with --resume to continue from the last checkpoint")
@takes(TrainSettings, name="settings")
def uptrain(
    as_json: bool = typer.Option(False, "--json", help="with --dry-run: print the plan as one JSON object"),
    settings: TrainSettings = None,
) -> None:
    """Continued pre-training of a converted model (the GQA paper's uptraining) with Accelerate."""
    result = run_uptrain(settings)
    if settings.dry_run and not as_json:
        typer.echo(format_plan(result))
    else:
        typer.echo(json.dumps(result, indent=2 if settings.dry_run else None))


@app.command()
@user_errors()
def plot(out: Path = typer.Argument(..., help="the output folder of an uptrain run (it holds metrics.jsonl)")) -> None:
    """Draw the recovery curve again: OUT/recovery.png from OUT/metrics.jsonl (needs matplotlib)."""
    typer.echo(f"wrote {plot_run(out)}")


@app.command()
@user_errors()
@takes(TokenizeOptions)
def tokenize(
    data: str = typer.Argument(
        ...,
        help="a text file (any name; UTF-8), a .jsonl/.json/.parquet/.csv/.arrow table, a folder of them, or a Hub dataset id",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="output token folder (shards and manifest.json)"),
    options: TokenizeOptions = None,
) -> None:
    """Tokenize a corpus once, in parallel, into token shards that uptrain --data reads directly."""
    result = run_tokenize(data, out, options)
    summary = {
        key: result[key] for key in ("tokens", "documents", "dtype", "seconds", "resumed_units") if key in result
    }
    typer.echo(json.dumps({"out": str(out), "shards": len(result["shards"]), **summary}))


@app.command("eval")
@user_errors()
@takes(EvalOptions)
def evaluate(
    model: str = typer.Argument(..., help="a transformers folder or a .gguf file"),
    data: str = typer.Option(..., help="a text file (or table file / folder with --text-column)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    options: EvalOptions = None,
) -> None:
    """Perplexity over non-overlapping windows of the text tokenized as one string."""
    result = run_evaluate(model, data, options)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(
            f"perplexity {result['perplexity']:.4f} over {result['tokens']:,} predicted tokens "
            f"(windows of {options.seq_len}, {result['dtype']} on {result['device']})"
        )


@app.command()
@user_errors()
@takes(BenchOptions)
def bench(
    models: list[str] = typer.Argument(..., help="transformers folders to compare (e.g. before and after pool)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    options: BenchOptions = None,
) -> None:
    """Decode speed and memory side by side: KV-cache bytes held, peak memory, tokens/s."""
    results = bench_models(models, options)
    typer.echo(json.dumps([asdict(result) for result in results]) if as_json else format_bench(results))


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
