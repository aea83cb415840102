"""An uptraining run: what the user sets (TrainSettings, checked where it is built), the checks that
need the model, data and output folder, and what preparation derives (TrainPlan)."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from gqa_convert.arch import check_seq_len
from gqa_convert.data.manifest import is_token_folder, read_manifest
from gqa_convert.data.text import check_data
from gqa_convert.errors import GQAConvertError
from gqa_convert.io.output import check_output_folder
from gqa_convert.io.sources import check_model_folder, model_config

PRECISIONS = ("auto", "no", "bf16", "fp16")
TRAINABLE = ("all", "attention")
REPORTERS = ("none", "tensorboard", "wandb")


@dataclass(frozen=True, kw_only=True)
class TrainSettings:
    """Everything `gqa-convert uptrain` takes; defaults are the CLI's."""

    model: str
    out: str
    data: str
    tokens: str | None = None
    fraction: float = 0.05
    original_tokens: str | None = None
    text_column: str = "text"
    data_config: str | None = None
    split: str = "train"
    seq_len: int = 2048
    micro_batch_size: int = 4
    grad_accum: int = 1
    global_batch_tokens: int | None = None
    lr: float = 5e-5
    min_lr_ratio: float = 0.1
    warmup_steps: int | None = None  # default: 2% of the steps, at least 1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    mixed_precision: str = "auto"
    gradient_checkpointing: bool = False
    trainable: str = "all"
    seed: int = 0
    save_every: int = 500
    keep_checkpoints: int = 2
    resume: bool = False
    force: bool = False
    report_to: str = "none"
    eval_data: str | None = None
    eval_every: int = 0
    eval_tokens: int = 65536
    num_processes: int | None = None  # default: every visible GPU, or 1
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int = 29500
    accelerate_config: str | None = None
    dry_run: bool = False
    timeout_minutes: float = 60.0  # waits on other machines: rank 0's tokenization, rendezvous, collectives
    teacher: str | None = None  # distil from this model's logits (the unconverted source)
    distill_weight: float = 0.5  # loss = (1 - w) LM + w T^2 KL(teacher || student)
    distill_temperature: float = 1.0

    def __post_init__(self) -> None:
        """Every check that needs neither files nor devices."""
        if self.seq_len < 2:
            raise GQAConvertError("--seq-len must be at least 2")
        for name in ("micro_batch_size", "grad_accum", "save_every", "keep_checkpoints", "num_machines"):
            if getattr(self, name) < 1:
                raise GQAConvertError(f"--{name.replace('_', '-')} must be at least 1")
        if not self.lr > 0 or not 0 <= self.min_lr_ratio <= 1:
            raise GQAConvertError("--lr must be positive and --min-lr-ratio in [0, 1]")
        if (self.warmup_steps is not None and self.warmup_steps < 0) or self.weight_decay < 0 or self.grad_clip < 0:
            raise GQAConvertError("--warmup-steps, --weight-decay and --grad-clip must not be negative")
        for name, value, choices in (
            ("trainable", self.trainable, TRAINABLE),
            ("mixed-precision", self.mixed_precision, PRECISIONS),
            ("report-to", self.report_to, REPORTERS),
        ):
            if value not in choices:
                raise GQAConvertError(f"--{name} must be one of: {', '.join(choices)}")
        if self.num_machines > 1 and not self.main_process_ip:
            raise GQAConvertError("--num-machines > 1 needs --main-process-ip (the address of machine rank 0)")
        if self.eval_every and not self.eval_data:
            raise GQAConvertError("--eval-every needs --eval-data")
        if self.eval_every < 0 or self.eval_tokens < 2:
            raise GQAConvertError("--eval-every must not be negative and --eval-tokens at least 2")
        if not self.timeout_minutes > 0:
            raise GQAConvertError("--timeout-minutes must be positive")
        if not 0 < self.distill_weight <= 1 or self.distill_temperature <= 0:
            raise GQAConvertError("--distill-weight must be in (0, 1] and --distill-temperature positive")


@dataclass(frozen=True)
class TrainPlan:
    """What preparation derived: sizes, step budget and the token folders the workers read."""

    settings: TrainSettings
    world_size: int
    grad_accum: int
    steps: int
    budget_origin: str
    train_tokens: str  # a token folder (data.tokens)
    eval_tokens: str | None = None
    scratch: str | None = None  # a dry run's temporary token folders, removed after it

    @property
    def step_tokens(self) -> int:
        """Tokens per optimizer step over every process."""
        return self.settings.micro_batch_size * self.settings.seq_len * self.world_size * self.grad_accum

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> TrainPlan:
        fields = json.loads(text)
        return cls(**{**fields, "settings": TrainSettings(**fields["settings"])})


def resolve_precision(setting: str) -> str:
    """auto: bf16 on GPUs that have it, else no. A precision that needs a GPU is refused without one."""
    import torch

    cuda = torch.cuda.is_available()
    if setting == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "no"
    if setting != "no" and not cuda:
        raise GQAConvertError(f"--mixed-precision {setting} needs a GPU; use no on CPU")
    return setting


def check_settings(settings: TrainSettings) -> Any:
    """The checks that read the model, data and output folder. Returns the model's config."""
    model = Path(settings.model)
    config = check_model_folder(model)
    check_seq_len(settings.seq_len, config)
    resolve_precision(settings.mixed_precision)
    if settings.report_to != "none" and importlib.util.find_spec(settings.report_to) is None:
        raise GQAConvertError(
            f"--report-to {settings.report_to} needs its package: pip install 'gqa-convert[{settings.report_to}]'"
        )
    if settings.accelerate_config and not Path(settings.accelerate_config).is_file():
        raise GQAConvertError(f"accelerate config not found: {settings.accelerate_config}")
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
    check_output_folder(
        Path(settings.out),
        model,
        settings.force and machine_rank(settings) == 0,
        # only machine rank 0 writes OUT before training; the others find it already begun
        resume=settings.resume or machine_rank(settings) > 0,
        in_place=True,
        fix="pass --resume to continue it or --force to replace it",
    )
    return config


def machine_rank(settings: TrainSettings) -> int:
    """This machine's rank: --machine-rank, else the Accelerate YAML's machine_rank, else 0."""
    if settings.machine_rank or not settings.accelerate_config:
        return settings.machine_rank
    return int(yaml.safe_load(Path(settings.accelerate_config).read_text()).get("machine_rank", 0))


def world_size(settings: TrainSettings) -> int:
    if settings.num_processes is not None:
        return settings.num_processes
    if settings.accelerate_config:
        return int(yaml.safe_load(Path(settings.accelerate_config).read_text()).get("num_processes", 1))
    import torch

    return max(torch.cuda.device_count(), 1) * settings.num_machines
