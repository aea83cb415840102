"""The `gqa-convert` command: each subcommand parses its flags, builds the library's options (which
validate themselves) and calls one library function."""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import typer

from gqa_convert.benchmark import BenchOptions, bench_models, format_bench
from gqa_convert.command_line import OneLineErrors, changed_flags, takes, user_errors
from gqa_convert.data.tokenize import TokenizeOptions
from gqa_convert.data.tokenize import tokenize as run_tokenize
from gqa_convert.errors import GQAConvertError
from gqa_convert.evaluation import EvalOptions, TaskEvalOptions, evaluate_tasks, format_scores
from gqa_convert.evaluation import evaluate as run_evaluate
from gqa_convert.inspection import InspectOptions, format_inspect, inspect_checkpoint
from gqa_convert.planning.report import format_plan
from gqa_convert.report.recovery import plot_run
from gqa_convert.surgery.convert import expand as run_expand
from gqa_convert.surgery.convert import pool as run_pool
from gqa_convert.surgery.options import ExpandOptions, PoolOptions
from gqa_convert.surgery.recipe_files import load_recipe, recipe_yaml
from gqa_convert.surgery.recipes import DEFAULT_RECIPE, RECIPES
from gqa_convert.train.launch import uptrain as run_uptrain
from gqa_convert.train.settings import TrainSettings

app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Convert multi-head attention checkpoints to grouped-query attention, and recover them.",
)

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


@app.command()
@user_errors(_LEFT_BY_INTERRUPTION)
@takes(PoolOptions)
def pool(source: str = SOURCE, out: Path = OUT, options: PoolOptions = None) -> None:
    """Group the query heads and merge each group's K/V projections (MHA/GQA -> GQA/MQA), by a recipe."""
    _summary(run_pool(source, out, options))


@app.command()
@user_errors()
def recipes(
    name: Optional[str] = typer.Argument(None, help="print this recipe in full, as a YAML file to copy and edit"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """The built-in recipes of pool, one line each (the default marked); with NAME, one in full."""
    if name is not None:
        recipe = load_recipe(name)
        typer.echo(json.dumps(recipe.as_dict(every_section=False)) if as_json else recipe_yaml(recipe), nl=as_json)
        return
    if as_json:
        typer.echo(json.dumps({"default": DEFAULT_RECIPE, "recipes": [r.as_dict() for r in RECIPES.values()]}))
        return
    width = max(map(len, RECIPES))
    for recipe in RECIPES.values():
        mark = " (default)" if recipe.name == DEFAULT_RECIPE else ""
        typer.echo(f"{recipe.name:<{width}}  {recipe.summary}{mark}")


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
@takes(TaskEvalOptions, name="task_options")
def evaluate(
    model: str = typer.Argument(..., help="a transformers folder or a .gguf file"),
    data: Optional[str] = typer.Option(
        None, help="perplexity on a text file (or table file / folder with --text-column)"
    ),
    baseline: Optional[str] = typer.Option(None, help="with --tasks: the source model, scored too, with retention (%)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
    options: EvalOptions = None,
    task_options: TaskEvalOptions = None,
) -> None:
    """Perplexity over non-overlapping windows of the text tokenized as one string (--data), or accuracy
    on lm-eval tasks (--tasks), optionally side by side with the source model (--baseline)."""
    if (data is None) == (not task_options.tasks):
        raise GQAConvertError("give --data TEXT (perplexity) or --tasks NAMES (lm-eval tasks), one of them")
    ignored = (
        changed_flags(options, ("seq_len", "max_tokens", "text_column"))
        if data is None
        else [
            *changed_flags(task_options, ("include_path", "limit", "num_fewshot", "seed")),
            *(["--baseline"] if baseline is not None else []),
        ]
    )
    for flag in ignored:
        warnings.warn(f"{flag} is ignored with {'--tasks' if data is None else '--data'}", stacklevel=1)
    if data is None:
        shared = {"batch_size": options.batch_size, "dtype": options.dtype, "device": options.device}
        scores = evaluate_tasks(model, task_options.replace(**shared), baseline)
        typer.echo(json.dumps(scores) if as_json else format_scores(scores))
        return
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
