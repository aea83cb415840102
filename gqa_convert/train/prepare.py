"""Everything before the workers start: validation, the step budget, and the token folders (given,
or raw data tokenized once by machine rank 0 into OUT/data; see train.token_data), so a bad data file
fails in one process with one message and nothing is written to OUT."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

from gqa_convert.data.manifest import TokenizerInfo, tokenizer_info
from gqa_convert.errors import GQAConvertError
from gqa_convert.io.sources import load_tokenizer
from gqa_convert.train.budget import resolve_budget
from gqa_convert.train.settings import TrainPlan, TrainSettings, check_settings, machine_rank, world_size
from gqa_convert.train.token_data import RunData, build, check_count, make_data, plan_data, wait_for_data

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


def _dry_run_data(items: list[RunData], settings: TrainSettings, info: TokenizerInfo, out: Path) -> Path:
    """A dry run tokenizes only what its measured step reads, into a temporary folder beside OUT."""
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.dry-run-", dir=out.parent))
    try:
        for item in items:
            if item.raw:
                folder = scratch / item.folder.name
                manifest = build(replace(item, head=True), settings, info, folder)
                check_count(manifest, item, settings)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return scratch


def _data(settings: TrainSettings, need: int, out: Path) -> tuple[RunData, RunData | None, str | None]:
    """The run's token folders: made (machine rank 0) or waited for (the others), checked."""
    info = tokenizer_info(load_tokenizer(settings.model, check_vocab=True))
    train = plan_data(settings.data, settings, info, out, settings.seq_len, need, head=False)
    evaluation = None
    if settings.eval_data:
        evaluation = plan_data(settings.eval_data, settings, info, out, 2, settings.eval_tokens, head=True)
    items = [train] if evaluation is None else [train, evaluation]
    if settings.dry_run:
        scratch = _dry_run_data(items, settings, info, out)
        moved = [replace(item, folder=scratch / item.folder.name) if item.raw else item for item in items]
        return moved[0], (moved[1] if evaluation else None), str(scratch)
    rank = machine_rank(settings)
    if rank == 0:
        make_data(items, settings, info, out)
    else:
        wait_for_data(items, settings, out, rank)
    return train, evaluation, None


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
    out = Path(settings.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    need = (budget.global_batch_tokens if settings.dry_run else budget.tokens) + settings.seq_len
    train, evaluation, scratch = _data(settings, need, out)
    return TrainPlan(
        settings=settings,
        world_size=world,
        grad_accum=accum,
        steps=budget.steps,
        budget_origin=budget.origin,
        train_tokens=str(train.folder),
        eval_tokens=str(evaluation.folder) if evaluation else None,
        scratch=scratch,
    )
