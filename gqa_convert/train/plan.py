"""The plan of a run, made once before any worker starts. prepare() resolves everything in one pass,
in order: the user's settings checked against the model, data and output folder; the strategy and
the precision; the world size and the step budget; the token folders; the checkpoint to resume from.
It returns one frozen TrainPlan, which the workers receive as it is. Bad input fails here, in one
process, with one line, and leaves OUT as it was."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gqa_convert.arch import check_seq_len
from gqa_convert.data.manifest import is_token_folder, read_manifest, tokenizer_info
from gqa_convert.data.text import check_data
from gqa_convert.errors import GQAConvertError
from gqa_convert.io.output import guard_output, output_lock, write_error
from gqa_convert.io.provenance import read_record
from gqa_convert.io.sources import check_model_folder, load_tokenizer, model_config
from gqa_convert.train.accelerate_yaml import AccelerateConfig, read_accelerate_config
from gqa_convert.train.checkpoint import newest_intact
from gqa_convert.train.checkpoint.contract import check_compatible, model_identity, run_identity
from gqa_convert.train.data import prepare_data
from gqa_convert.train.settings import TrainSettings
from gqa_convert.train.strategies import resolve_strategy

WORKER_ENV = "GQA_CONVERT_WORKER_PLAN"  # the plan handed to the worker processes


@dataclass(frozen=True)
class TrainPlan:
    """Everything a worker needs, resolved once."""

    settings: TrainSettings
    strategy: str  # a name of train.strategies.STRATEGIES
    precision: str  # no, bf16 or fp16
    world_size: int
    grad_accum: int
    steps: int
    budget_origin: str
    vocab_size: int  # every id fed to the model is below it
    train_tokens: str  # a token folder
    eval_tokens: str | None = None
    scratch: str | None = None  # a dry run's temporary token folders, removed after it
    identity: dict[str, Any] = field(default_factory=dict)  # the run, as its checkpoints record it
    resume_step: int | None = None  # the checkpoint chosen to resume from (rank 0's choice is loaded)

    @property
    def out(self) -> Path:
        return Path(self.settings.out)

    @property
    def global_batch(self) -> int:
        """Sequences per optimizer step over every process."""
        return self.settings.micro_batch_size * self.world_size * self.grad_accum

    @property
    def step_tokens(self) -> int:
        """Tokens per optimizer step over every process."""
        return self.global_batch * self.settings.seq_len

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainPlan:
        fields = json.loads(text)
        return cls(**{**fields, "settings": TrainSettings(**fields["settings"])})


@contextlib.contextmanager
def prepared(settings: TrainSettings) -> Iterator[TrainPlan]:
    """prepare(), with OUT held for this run until the block ends: a second run into the same OUT is
    refused in one line naming the first (machines of rank > 0 join rank 0's run, holding nothing)."""
    with contextlib.ExitStack() as held:
        yield prepare(settings, held)


def prepare(settings: TrainSettings, held: contextlib.ExitStack | None = None) -> TrainPlan:
    """Check, resolve and size the run, and tokenize its data into OUT/data (see the module's doc).
    With `held`, machine rank 0 locks OUT (output_lock) until `held` closes."""
    if "LOCAL_RANK" in os.environ and not os.environ.get(WORKER_ENV):
        raise GQAConvertError(
            "run `gqa-convert uptrain` directly, not under accelerate launch or torchrun: "
            "it launches Accelerate itself (pass your YAML with --accelerate-config)"
        )
    yaml = read_accelerate_config(settings.accelerate_config) if settings.accelerate_config else None
    config = check_inputs(settings)
    rank = machine_rank(settings, yaml)
    out = Path(settings.out).resolve()
    # only machine rank 0 writes OUT before training; the others join the run it began, never clearing
    guard_output(
        out,
        inputs=[settings.model, settings.data, settings.eval_data, settings.teacher, settings.accelerate_config],
        force=settings.force and rank == 0,
        mode="resume" if settings.resume else ("join" if rank > 0 else "train"),
        fix="pass --resume to continue it or --force to replace it",
    )
    if held is not None and rank == 0 and not settings.dry_run:
        held.enter_context(output_lock(out))
    import torch

    cuda = torch.cuda.is_available()
    precision = resolve_precision(settings.mixed_precision, cuda)
    strategy = resolve_strategy(settings.strategy, yaml, precision, cuda)
    world = world_size(settings, yaml, torch.cuda.device_count())
    accum = resolve_grad_accum(settings, world)
    step_tokens = settings.micro_batch_size * accum * world * settings.seq_len
    steps, origin = resolve_budget(settings, step_tokens)
    info = tokenizer_info(load_tokenizer(settings.model, check_vocab=True))
    facts = dict(
        model=model_identity(config, info.identity["fingerprint"]),
        teacher=model_identity(model_config(settings.teacher)) if settings.teacher else None,
        global_batch=step_tokens // settings.seq_len,
        steps=steps,
        checkpoint_format=strategy.checkpoint_format,
        world=world,
        precision=precision,
    )
    # the checkpoint to continue, checked against everything but the data before any data is tokenized
    resume = None
    if settings.resume and not settings.dry_run:  # a dry run reads only the head of raw data: no identity
        resume = newest_intact(out, settings.trust_deepspeed_checkpoint)
    if resume is not None:
        check_compatible(resume.run, run_identity(settings, data=None, **facts), resume.folder.name)
    need = (step_tokens if settings.dry_run else steps * step_tokens) + settings.seq_len
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        train, evaluation, scratch, added = prepare_data(settings, info, out, need, rank, config.vocab_size)
    except OSError as error:
        raise (write_error(error, out) or error) from None
    identity = run_identity(settings, data=str(train.folder), **facts)
    if resume is not None:
        try:
            check_compatible(resume.run, identity, resume.folder.name)
        except GQAConvertError:
            for folder in added:  # tokenized by this run for nothing: OUT is left as it was
                shutil.rmtree(folder, ignore_errors=True)
            raise
    return TrainPlan(
        settings=settings,
        strategy=strategy.name,
        precision=precision,
        world_size=world,
        grad_accum=accum,
        steps=steps,
        budget_origin=origin,
        vocab_size=config.vocab_size,
        train_tokens=str(train.folder),
        eval_tokens=str(evaluation.folder) if evaluation else None,
        scratch=scratch,
        identity=identity,
        resume_step=resume.step if resume is not None else None,
    )


def check_inputs(settings: TrainSettings) -> Any:
    """What the model, teacher and data must be before anything runs. Returns the model's config."""
    config = check_model_folder(Path(settings.model))
    check_seq_len(settings.seq_len, config)
    if settings.report_to != "none" and importlib.util.find_spec(settings.report_to) is None:
        raise GQAConvertError(
            f"--report-to {settings.report_to} needs its package: pip install 'gqa-convert[{settings.report_to}]'"
        )
    if settings.teacher is not None:
        teacher_config = model_config(settings.teacher)
        if teacher_config.vocab_size != config.vocab_size:
            raise GQAConvertError(
                f"the teacher's vocabulary ({teacher_config.vocab_size}) differs from the model's "
                f"({config.vocab_size}): distil from the model it was converted from"
            )
    for data in (settings.data, settings.eval_data):
        if data is not None:
            if is_token_folder(data):
                read_manifest(data)
            else:
                check_data(data)
    return config


def resolve_precision(setting: str, cuda: bool) -> str:
    """auto: bf16 on GPUs that have it, else no. A precision that needs a GPU is refused without one."""
    import torch

    if setting == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if setting != "no" and not cuda:
        raise GQAConvertError(f"--mixed-precision {setting} needs a GPU; use no on CPU")
    return setting


def machine_rank(settings: TrainSettings, yaml: AccelerateConfig | None) -> int:
    """This machine's rank: --machine-rank, else the Accelerate YAML's machine_rank, else 0."""
    if settings.machine_rank or yaml is None:
        return settings.machine_rank
    return yaml.machine_rank or 0


def world_size(settings: TrainSettings, yaml: AccelerateConfig | None, gpus: int) -> int:
    """Processes over every machine: --num-processes, else the YAML's, else every GPU (or one)."""
    if settings.num_processes is not None:
        return settings.num_processes
    if yaml is not None and yaml.num_processes is not None:
        return yaml.num_processes
    return max(gpus, 1) * settings.num_machines


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


# ---- the token budget ----
# Published pre-training tokens (model cards and papers). Keys match a lower-case model name.
KNOWN_PRETRAINING_TOKENS = {
    "smollm2-135m": 2 * 10**12,
    "llama-7b": 10**12,
    "llama-13b": 10**12,
    "llama-30b": 14 * 10**11,
    "llama-33b": 14 * 10**11,
    "llama-65b": 14 * 10**11,
    "llama-2-7b": 2 * 10**12,
    "llama-2-13b": 2 * 10**12,
    "llama-2-70b": 2 * 10**12,
    "olmo-1b": 3 * 10**12,
    "olmo-7b": 246 * 10**10,
    "phi-2": 14 * 10**11,
    "pythia": 300 * 10**9,
    "stablelm-3b-4e1t": 4 * 10**12,
    "gemma-7b": 6 * 10**12,
    "qwen-7b": 24 * 10**11,
}


def known_pretraining_tokens(model_folder: Path) -> tuple[int, str] | None:
    """The published budget of the model this folder was converted from, if the table knows it."""
    names = [model_folder.resolve().name]
    record = read_record(model_folder)
    if record is not None:
        names.insert(0, Path(str(record.get("source", ""))).name)
    for name in names:
        normalized = name.lower().replace("_", "-")
        for key in sorted(KNOWN_PRETRAINING_TOKENS, key=len, reverse=True):
            if key in normalized:
                return KNOWN_PRETRAINING_TOKENS[key], key
    return None


def resolve_budget(settings: TrainSettings, step_tokens: int) -> tuple[int, str]:
    """(optimizer steps, how the budget was decided): --tokens, or --fraction of the original
    pre-training tokens. Training consumes whole steps, so at most one step above the request."""
    if settings.tokens is not None:
        requested, origin = settings.tokens, f"--tokens {settings.tokens}"
    else:
        if settings.original_tokens is not None:
            base, source = settings.original_tokens, f"--original-tokens {settings.original_tokens}"
        else:
            known = known_pretraining_tokens(Path(settings.model))
            if known is None:
                raise GQAConvertError(
                    "the original pre-training budget of this model is not known: "
                    "pass --tokens N, or --original-tokens N with --fraction"
                )
            base, source = known[0], f"published budget of {known[1]}"
        requested = int(base * settings.fraction)
        origin = f"{settings.fraction:g} x {base:,} tokens ({source})"
    if requested < step_tokens:
        raise GQAConvertError(
            f"the budget ({requested:,} tokens) is smaller than one optimizer step ({step_tokens:,} "
            "tokens): raise --tokens or lower --micro-batch-size, --grad-accum or --seq-len"
        )
    return math.ceil(requested / step_tokens), origin
