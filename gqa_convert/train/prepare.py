"""Everything before the workers start: validation, the step budget, and the data tokenized once into
OUT/data (nanoGPT's prepare step), so a bad data file fails in one process with one message and
nothing is written to OUT."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from rich.progress import Progress, SpinnerColumn, TextColumn

from gqa_convert.data.text import iter_documents
from gqa_convert.data.tokens import data_fingerprint, tokenize_to_file
from gqa_convert.errors import GQAConvertError
from gqa_convert.io.output import clear_output_folder, remove_stale_work, work_folder
from gqa_convert.io.sources import load_tokenizer
from gqa_convert.train.budget import resolve_budget
from gqa_convert.train.settings import TrainPlan, TrainSettings, check_settings, world_size

WORKER_ENV = "GQA_CONVERT_WORKER_PLAN"  # the plan handed to the worker processes


def resolve_grad_accum(settings: TrainSettings, world: int) -> int:
    """Gradient accumulation steps, from --grad-accum or --global-batch-tokens."""
    per_micro_step = settings.micro_batch_size * world * settings.seq_len
    if settings.global_batch_tokens is None:
        return settings.grad_accum
    if settings.global_batch_tokens % per_micro_step:
        raise GQAConvertError(
            f"--global-batch-tokens {settings.global_batch_tokens} is not a multiple of micro batch x processes "
            f"x seq len = {per_micro_step}"
        )
    return settings.global_batch_tokens // per_micro_step


def _tokenize(
    data: str,
    settings: TrainSettings,
    tokenizer: Any,
    reuse: Path | None,
    staging: Path,
    name: str,
    max_tokens: int | None,
) -> str:
    """The file name of `data` tokenized; made in `staging` unless `reuse` (OUT/data) already has it."""
    file_name = f"{name}-{data_fingerprint(data, tokenizer, settings.text_column, str(max_tokens))}.tokens"
    if reuse is not None and (reuse / file_name).exists():
        return file_name
    documents = iter_documents(data, settings.text_column, settings.data_config, settings.split)
    columns = (SpinnerColumn(), TextColumn("{task.description}"), TextColumn("{task.completed:,} tokens"))
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(f"tokenizing {data}", total=max_tokens)
        count = tokenize_to_file(
            documents, tokenizer, staging / file_name, max_tokens, on_tokens=lambda n: progress.advance(task, n)
        )
    if count < settings.seq_len:
        raise GQAConvertError(
            f"{data} holds {count} tokens, fewer than one block of --seq-len {settings.seq_len}: "
            "give more text or lower --seq-len"
        )
    return file_name


def _tokenize_all(
    settings: TrainSettings, tokenizer: Any, reuse: Path | None, staging: Path, need: int
) -> tuple[str, str | None]:
    try:
        train_name = _tokenize(settings.data, settings, tokenizer, reuse, staging, "train", need)
        eval_name = None
        if settings.eval_data:
            eval_name = _tokenize(settings.eval_data, settings, tokenizer, reuse, staging, "eval", settings.eval_tokens)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return train_name, eval_name


def _move_into(staging: Path, out: Path, settings: TrainSettings) -> Path:
    """OUT/data, filled from the staging folder (OUT replaced first with --force)."""
    if settings.force and not settings.resume:
        clear_output_folder(out)  # only an empty folder or one this tool wrote
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    for file in staging.iterdir():
        shutil.move(str(file), data_dir / file.name)
    shutil.rmtree(staging)
    return data_dir


def prepare(settings: TrainSettings) -> TrainPlan:
    """Validate, size the run and tokenize the data into OUT/data. The data is tokenized beside OUT
    and moved in only when every check passed: bad input leaves OUT as it was. A dry run leaves its
    tokens in a temporary folder that the caller removes."""
    check_settings(settings)
    if "LOCAL_RANK" in os.environ and not os.environ.get(WORKER_ENV):
        raise GQAConvertError(
            "run `gqa-convert uptrain` directly, not under accelerate launch or torchrun: "
            "it launches Accelerate itself (pass your YAML with --accelerate-config)"
        )
    world = world_size(settings)
    accum = resolve_grad_accum(settings, world)
    step_tokens = settings.micro_batch_size * accum * world * settings.seq_len
    budget = resolve_budget(
        Path(settings.model), settings.tokens, settings.fraction, settings.original_tokens, step_tokens
    )
    tokenizer = load_tokenizer(settings.model)
    out = Path(settings.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    reuse = None if settings.force and not settings.resume else out / "data"  # --force starts afresh
    need = (budget.global_batch_tokens if settings.dry_run else budget.tokens) + settings.seq_len
    remove_stale_work(out)
    staging = work_folder(out, "data")
    train_name, eval_name = _tokenize_all(settings, tokenizer, reuse, staging, need)
    data_dir = staging if settings.dry_run else _move_into(staging, out, settings)
    return TrainPlan(
        settings=settings,
        world_size=world,
        grad_accum=accum,
        steps=budget.steps,
        budget_origin=budget.origin,
        tokens_file=str(data_dir / train_name),
        eval_tokens_file=str(data_dir / eval_name) if eval_name else None,
    )
