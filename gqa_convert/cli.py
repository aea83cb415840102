"""The `gqa-convert` command: each subcommand parses its flags, builds the library's options (which
validate themselves) and calls one library function."""

from __future__ import annotations

import contextlib
import enum
import functools
import json
import logging
import os
import signal
import sys
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional

import typer
import typer.core

from gqa_convert.benchmark import BenchOptions, bench_models, format_bench
from gqa_convert.data.tokenize import TokenizeOptions
from gqa_convert.data.tokenize import tokenize as run_tokenize
from gqa_convert.errors import GQAConvertError, one_line
from gqa_convert.evaluation import EVAL_DTYPES, EvalOptions, TaskEvalOptions, evaluate_tasks, format_scores
from gqa_convert.evaluation import evaluate as run_evaluate
from gqa_convert.evaluation.tasks import INSTALL_HINT, LOCAL_TASK_NAMES
from gqa_convert.inspection import InspectOptions, format_inspect, inspect_checkpoint
from gqa_convert.surgery.calibration.settings import KEY_MERGES, OUTPUT_RIDGES, REFINE_TARGETS, VALUE_MOMENTS
from gqa_convert.surgery.convert import expand as run_expand
from gqa_convert.surgery.convert import pool as run_pool
from gqa_convert.surgery.groupings import GROUPINGS
from gqa_convert.surgery.methods import METHODS
from gqa_convert.surgery.options import Calibration, ExpandOptions, PoolOptions
from gqa_convert.train.launch import uptrain as run_uptrain
from gqa_convert.train.settings import TrainSettings
from gqa_convert.units import DTYPE_NAMES, parse_tokens


def _flags_show_no_type() -> None:
    """typer 0.29 prints a value type (<bool>) after every flag in --help, though a flag takes no
    value; show none, as click does."""
    option_class = getattr(typer.core, "TyperOption", None)
    shown = getattr(option_class, "display_type_rich", None)
    if shown is None or getattr(shown, "flags_show_no_type", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    display_type_rich.flags_show_no_type = True  # type: ignore[attr-defined]
    option_class.display_type_rich = display_type_rich


_flags_show_no_type()
app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Convert multi-head attention checkpoints to grouped-query attention, and recover them.",
)

Method = enum.Enum("Method", {name: name for name in METHODS}, type=str)
Grouping = enum.Enum("Grouping", {name: name for name in GROUPINGS}, type=str)
DType = enum.Enum("DType", {name: name for name in DTYPE_NAMES}, type=str)
EvalDType = enum.Enum("EvalDType", {name: name for name in EVAL_DTYPES}, type=str)
KeyMerge = enum.Enum("KeyMerge", {name: name for name in KEY_MERGES}, type=str)
ValueMoment = enum.Enum("ValueMoment", {name: name for name in VALUE_MOMENTS}, type=str)
RefineTarget = enum.Enum("RefineTarget", {name: name for name in REFINE_TARGETS}, type=str)
_METHOD_HELP = "how a group's heads merge: " + "; ".join(f"{m.name}: {m.help}" for m in METHODS.values())
_GROUPING_HELP = "which heads form a group: " + "; ".join(f"{g.name}: {g.help}" for g in GROUPINGS.values())


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program stands so that it unwinds like Ctrl-C (staged output removed)."""


# What an interruption leaves, per command.
_INTERRUPTED = {
    "pool": "nothing was written to the output folder",
    "expand": "nothing was written to the output folder",
    "uptrain": "rerun with --resume to continue from the last checkpoint",
}


def _terminate(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise Terminated


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: signals cannot be caught here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _user_errors(command: Callable[..., Any]) -> Callable[..., Any]:
    """Bad input: one line on stderr and exit 2, no traceback. Ctrl-C and SIGTERM: one line, exit
    130 and 143, after the staged output was removed."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        warnings.formatwarning = lambda message, category, *rest: f"warning: {one_line(message)}\n"
        note = _INTERRUPTED.get(command.__name__)
        try:
            with _sigterm_unwinds():
                return command(*args, **kwargs)
        except GQAConvertError as error:
            typer.echo(f"error: {one_line(error)}", err=True)
            raise typer.Exit(2) from None
        except Terminated:
            typer.echo("terminated" + (f"; {note}" if note else ""), err=True)
            raise typer.Exit(128 + signal.SIGTERM) from None
        except KeyboardInterrupt:
            typer.echo("interrupted" + (f"; {note}" if note else ""), err=True)
            raise typer.Exit(130) from None

    return wrapper


def _quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # datasets logs a file it cannot parse as an error of its own; our one line says so instead
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")  # read when datasets is first imported
    logging.getLogger("datasets").setLevel(logging.CRITICAL)


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
    options = InspectOptions(
        seq_len=seq_len, batch=batch, cache_dtype=cache_dtype, revision=revision, allow_pickle=allow_pickle
    )
    _quiet_libraries()
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
@_user_errors
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
    _quiet_libraries()
    _summary(run_pool(source, out, options))


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
    options = ExpandOptions(
        dtype=dtype.value, max_shard_size=max_shard_size, force=force, revision=revision, allow_pickle=allow_pickle
    )
    _quiet_libraries()
    _summary(run_expand(source, out, options))


@app.command()
@_user_errors
def uptrain(
    model: str = typer.Argument(..., help="a transformers folder (e.g. the output of pool)"),
    out: Path = typer.Option(..., "--out", "-o", help="output folder: final model, metrics.jsonl, checkpoints/"),
    data: str = typer.Option(
        ...,
        help="a token folder (gqa-convert tokenize), a text file (any name; UTF-8), a .jsonl/.json/.parquet/.csv/.arrow "
        "table, a folder of them, or a Hub dataset id",
    ),
    tokens: Optional[str] = typer.Option(None, help="token budget, e.g. 50M or 2B (overrides --fraction)"),
    fraction: float = typer.Option(0.05, help="budget as a fraction of the original pre-training tokens"),
    original_tokens: Optional[str] = typer.Option(None, help="the original pre-training tokens, e.g. 2T"),
    text_column: str = typer.Option("text", help="text column of table data"),
    data_config: Optional[str] = typer.Option(None, help="Hub dataset configuration"),
    split: str = typer.Option("train", help="Hub dataset split"),
    seq_len: int = typer.Option(2048, help="tokens per packed block"),
    micro_batch_size: int = typer.Option(4, help="blocks per process per forward"),
    grad_accum: int = typer.Option(1, help="micro-batches per optimizer step"),
    global_batch_tokens: Optional[int] = typer.Option(None, help="tokens per optimizer step (sets --grad-accum)"),
    lr: float = typer.Option(5e-5, help="peak learning rate"),
    min_lr_ratio: float = typer.Option(0.1, help="final learning rate as a fraction of --lr (cosine)"),
    warmup_steps: Optional[int] = typer.Option(None, help="linear warmup steps (default 2% of the steps)"),
    weight_decay: float = typer.Option(0.1, help="AdamW weight decay (not on biases and norms)"),
    grad_clip: float = typer.Option(1.0, help="gradient norm clip (0: off)"),
    mixed_precision: str = typer.Option("auto", help="auto (bf16 on GPUs that have it, else no), no, bf16, fp16"),
    gradient_checkpointing: bool = typer.Option(False, "--gradient-checkpointing", help="trade compute for memory"),
    trainable: str = typer.Option("all", help="all, or attention (q/k/v/o only: less optimizer memory)"),
    seed: int = typer.Option(0, help="data order seed"),
    save_every: int = typer.Option(500, help="optimizer steps between checkpoints"),
    keep_checkpoints: int = typer.Option(2, help="checkpoints kept"),
    resume: bool = typer.Option(False, "--resume", help="continue from the latest checkpoint in OUT"),
    force: bool = typer.Option(False, "--force", help="replace a non-empty OUT"),
    report_to: str = typer.Option("none", help="none, tensorboard or wandb"),
    eval_data: Optional[str] = typer.Option(
        None, help="held-out text (or token folder) for perplexity during training"
    ),
    eval_every: int = typer.Option(0, help="steps between evaluations (0: at the end only)"),
    eval_tokens: int = typer.Option(65536, help="tokens of --eval-data used"),
    num_processes: Optional[int] = typer.Option(None, help="processes over all machines (default: every GPU)"),
    num_machines: int = typer.Option(1, help="machines"),
    machine_rank: int = typer.Option(
        0, help="this machine's rank (machines of --num-machines are numbered by the rendezvous)"
    ),
    main_process_ip: Optional[str] = typer.Option(None, help="address of machine rank 0"),
    main_process_port: Optional[int] = typer.Option(
        None, help="port on machine rank 0 (default: the YAML's, or 29500)"
    ),
    accelerate_config: Optional[str] = typer.Option(
        None, help="an Accelerate YAML: processes and machines, and FSDP (version 2) or DeepSpeed ZeRO-3"
    ),
    strategy: str = typer.Option(
        "auto", help="auto (the YAML's sharding, else ddp), ddp, fsdp2 (sharded, CPU or GPU) or deepspeed (ZeRO-3, GPU)"
    ),
    dry_run: bool = typer.Option(False, "--dry-run", help="print the plan and a measured time estimate"),
    timeout_minutes: float = typer.Option(
        60.0, help="how long a process waits for the others: rank 0's tokenization, rendezvous, collectives"
    ),
    teacher: Optional[str] = typer.Option(
        None, help="distil from this model (folder or .gguf): the unconverted source"
    ),
    distill_weight: float = typer.Option(0.5, help="weight of the distillation loss (the LM loss gets 1 - w)"),
    distill_temperature: float = typer.Option(1.0, help="softmax temperature of the distillation"),
) -> None:
    """Continued pre-training of a converted model (the GQA paper's uptraining) with Accelerate."""
    arguments = {k: v for k, v in locals().items() if k in TrainSettings.__dataclass_fields__}
    settings = TrainSettings(**{**arguments, "out": str(out)})
    _quiet_libraries()
    result = run_uptrain(settings)
    typer.echo(json.dumps(result, indent=2 if dry_run else None))


@app.command()
@_user_errors
def tokenize(
    data: str = typer.Argument(
        ...,
        help="a text file (any name; UTF-8), a .jsonl/.json/.parquet/.csv/.arrow table, a folder of them, or a Hub dataset id",
    ),
    out: Path = typer.Option(..., "--out", "-o", help="output token folder (shards and manifest.json)"),
    tokenizer: str = typer.Option(..., help="a model folder or .gguf file whose tokenizer to use"),
    num_proc: Optional[int] = typer.Option(None, help="worker processes (default: every core)"),
    text_column: str = typer.Option("text", help="text column of table data"),
    data_config: Optional[str] = typer.Option(None, help="Hub dataset configuration"),
    split: str = typer.Option("train", help="Hub dataset split"),
    max_tokens: Optional[str] = typer.Option(
        None, help="stop once the units, in order, hold this many tokens (e.g. 2B)"
    ),
    force: bool = typer.Option(
        False, "--force", help="replace a non-empty OUT, or restart an unfinished run of another job"
    ),
) -> None:
    """Tokenize a corpus once, in parallel, into token shards that uptrain --data reads directly."""
    options = TokenizeOptions(
        tokenizer=tokenizer,
        num_proc=num_proc,
        text_column=text_column,
        data_config=data_config,
        split=split,
        max_tokens=None if max_tokens is None else parse_tokens(max_tokens),
        force=force,
    )
    _quiet_libraries()
    result = run_tokenize(data, out, options)
    summary = {
        key: result[key] for key in ("tokens", "documents", "dtype", "seconds", "resumed_units") if key in result
    }
    typer.echo(json.dumps({"out": str(out), "shards": len(result["shards"]), **summary}))


@app.command("eval")
@_user_errors
def evaluate(
    model: str = typer.Argument(..., help="a transformers folder or a .gguf file"),
    data: Optional[str] = typer.Option(
        None, help="perplexity on a text file (or table file / folder with --text-column)"
    ),
    tasks: Optional[str] = typer.Option(
        None,
        help=f"lm-eval task names, comma-separated ({INSTALL_HINT}); shipped, offline: {','.join(LOCAL_TASK_NAMES)}",
    ),
    include_path: Optional[list[Path]] = typer.Option(None, help="with --tasks: a folder of lm-eval task YAML files"),
    baseline: Optional[str] = typer.Option(None, help="with --tasks: the source model, scored too, with retention (%)"),
    limit: Optional[int] = typer.Option(None, help="with --tasks: only the first N examples of each task"),
    num_fewshot: Optional[int] = typer.Option(None, help="with --tasks: examples per prompt (default: the task's)"),
    seq_len: int = typer.Option(2048, help="window length"),
    max_tokens: Optional[int] = typer.Option(None, help="use only the first N tokens"),
    text_column: str = typer.Option("text", help="text column of table data"),
    batch_size: int = typer.Option(4, help="windows (or task requests) per forward"),
    dtype: EvalDType = typer.Option("auto", help="auto: the checkpoint's dtype on a GPU, float32 on a CPU"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Perplexity over non-overlapping windows of the text tokenized as one string (--data), or accuracy
    on lm-eval tasks (--tasks), optionally side by side with the source model (--baseline)."""
    if (data is None) == (tasks is None):
        raise GQAConvertError("give --data TEXT (perplexity) or --tasks NAMES (lm-eval tasks), one of them")
    flags = {
        "--seq-len": seq_len != 2048,
        "--max-tokens": max_tokens is not None,
        "--text-column": text_column != "text",
    }
    if data is not None:
        flags = {"--include-path": bool(include_path), "--baseline": baseline is not None, "--limit": limit is not None}
        flags["--num-fewshot"] = num_fewshot is not None
    for flag in (flag for flag, given in flags.items() if given):
        warnings.warn(f"{flag} is ignored with {'--data' if data else '--tasks'}", stacklevel=1)
    _quiet_libraries()
    if tasks is not None:
        task_options = TaskEvalOptions(
            tasks=tasks,
            include_path=tuple(include_path or ()),
            limit=limit,
            num_fewshot=num_fewshot,
            batch_size=batch_size,
            dtype=dtype.value,
        )
        scores = evaluate_tasks(model, task_options, baseline)
        typer.echo(json.dumps(scores) if as_json else format_scores(scores))
        return
    options = EvalOptions(
        seq_len=seq_len, max_tokens=max_tokens, text_column=text_column, batch_size=batch_size, dtype=dtype.value
    )
    result = run_evaluate(model, data, options)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(
            f"perplexity {result['perplexity']:.4f} over {result['tokens']:,} predicted tokens "
            f"(windows of {seq_len}, {result['dtype']} on {result['device']})"
        )


@app.command()
@_user_errors
def bench(
    models: list[str] = typer.Argument(..., help="transformers folders to compare (e.g. before and after pool)"),
    seq_len: int = typer.Option(2048, help="tokens per sequence before decoding"),
    batch: int = typer.Option(1, help="sequences decoded together"),
    new_tokens: int = typer.Option(32, help="tokens decoded per sequence"),
    dtype: EvalDType = typer.Option("auto", help="auto: the checkpoint's dtype on a GPU, float32 on a CPU"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object"),
) -> None:
    """Decode speed and memory side by side: KV-cache bytes held, peak memory, tokens/s."""
    options = BenchOptions(seq_len=seq_len, batch=batch, new_tokens=new_tokens, dtype=dtype.value)
    _quiet_libraries()
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
