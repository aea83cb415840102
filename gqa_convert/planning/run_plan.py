"""The plan of an uptraining run from its settings and the model's config alone (no weights, data or
output folder are read): the step budget, the memory per device and whether it fits, the smallest
changes that make it fit, and the time and GPU-hours of the budget. `uptrain --dry-run` returns
`plan_run(settings).to_dict()` (its JSON form) and prints it as a table (planning.report)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from gqa_convert.arch import check_seq_len
from gqa_convert.errors import GQAConvertError
from gqa_convert.planning.advice import Change, smallest_changes
from gqa_convert.planning.hardware import Target, duration, estimated_throughput, flops_per_token, plan_target
from gqa_convert.planning.memory import MemoryPlan, StepSetup, plan_memory
from gqa_convert.planning.shapes import ModelShape, model_shape, read_config
from gqa_convert.train.accelerate_yaml import read_accelerate_config
from gqa_convert.train.plan import resolve_budget, resolve_grad_accum, world_size
from gqa_convert.train.settings import TrainSettings
from gqa_convert.train.strategies import chosen_strategy


@dataclass(frozen=True)
class RunPlan:
    settings: TrainSettings
    shape: ModelShape
    teacher: ModelShape | None
    strategy: str
    world: int
    grad_accum: int
    steps: int
    budget_origin: str
    step_tokens: int
    target: Target
    memory: MemoryPlan
    toggled: MemoryPlan  # the same step with gradient checkpointing switched the other way
    changes: list[Change] = field(default_factory=list)
    time: dict[str, Any] | None = None
    time_note: str = ""

    @property
    def fits(self) -> bool | None:
        return None if self.target.memory is None else self.memory.required <= self.target.memory

    def to_dict(self) -> dict[str, Any]:
        settings, memory = self.settings, self.memory
        return {
            "model": settings.model,
            "model_type": self.shape.model_type,
            "parameters": self.shape.parameters,
            "teacher_parameters": self.teacher.parameters if self.teacher else None,
            "budget": self.budget_origin,
            "tokens": self.steps * self.step_tokens,
            "steps": self.steps,
            "global_batch_tokens": self.step_tokens,
            "micro_batch_size": memory.setup.micro_batch,
            "grad_accum": self.grad_accum,
            "processes": self.world,
            "machines": settings.num_machines,
            "strategy": self.strategy,
            "seq_len": settings.seq_len,
            "precision": memory.setup.precision,
            "device": memory.setup.device,
            "gradient_checkpointing": memory.setup.checkpointing,
            "trainable": memory.setup.trainable,
            "memory": _memory_dict(memory),
            "other_checkpointing": {
                "gradient_checkpointing": self.toggled.setup.checkpointing,
                "activations": self.toggled.activations,
                "peak": self.toggled.peak,
                "required": self.toggled.required,
            },
            "gpu": {"name": self.target.label, "memory": self.target.memory, "source": self.target.source},
            "fits": self.fits,
            "changes": [{"change": c.flags, "required": c.plan.required} for c in self.changes],
            "time": self.time,
            "time_note": self.time_note,
        }


def _memory_dict(memory: MemoryPlan) -> dict[str, Any]:
    return {
        "parameters": memory.parameters,
        "gradients": memory.gradients,
        "optimizer": memory.optimizer,
        "teacher": memory.teacher,
        "buffers": memory.buffers,
        "activations": memory.activations,
        "peak": memory.peak,
        "peak_phase": memory.peak_phase,
        "phases": memory.phases,
        "margin": memory.margin,
        "required": memory.required,
        "approximate": memory.approximate,
    }


def plan_strategy(settings: TrainSettings) -> str:
    """--strategy, else the YAML's sharding, else ddp; with the rules that do not depend on this
    machine (a plan for GPUs may be made on a laptop)."""
    yaml = read_accelerate_config(settings.accelerate_config) if settings.accelerate_config else None
    return chosen_strategy(settings.strategy, yaml).name


def plan_precision(setting: str, target: Target, strategy: str) -> tuple[str, str]:
    """(precision, device) of the planned run: a GPU when one is detected or stated, or when the
    settings need one (bf16/fp16, DeepSpeed); auto means bf16 on a GPU."""
    cuda = target.source != "none" or setting in ("bf16", "fp16") or strategy == "deepspeed"
    precision = ("bf16" if cuda else "no") if setting == "auto" else setting
    if strategy == "fsdp2" and precision == "fp16":
        raise GQAConvertError("--strategy fsdp2 trains in bf16 or fp32: use --mixed-precision bf16 or no")
    return precision, "cuda" if cuda else "cpu"


def plan_run(settings: TrainSettings, measured: tuple[float, str] | None = None) -> RunPlan:
    """Plan from the configs alone. `measured` is (tokens/s per process, device) of a step timed by
    --measure: it gives the time when measured on the kind of device planned for."""
    config = read_config(settings.model)
    check_seq_len(settings.seq_len, config)
    shape = model_shape(config)
    teacher = model_shape(read_config(settings.teacher)) if settings.teacher else None
    if teacher is not None and teacher.vocab != shape.vocab:
        raise GQAConvertError(
            f"the teacher's vocabulary ({teacher.vocab}) differs from the model's ({shape.vocab}): "
            "distil from the model it was converted from"
        )
    strategy = plan_strategy(settings)
    target = plan_target(settings.gpu, settings.gpu_memory)
    precision, device = plan_precision(settings.mixed_precision, target, strategy)
    yaml = read_accelerate_config(settings.accelerate_config) if settings.accelerate_config else None
    world = world_size(settings, yaml, _visible_gpus())
    accum = resolve_grad_accum(settings, world)
    step_tokens = settings.micro_batch_size * accum * world * settings.seq_len
    steps, origin = resolve_budget(settings, step_tokens)
    setup = StepSetup(
        strategy=strategy,
        world=world,
        precision=precision,
        device=device,
        micro_batch=settings.micro_batch_size,
        seq_len=settings.seq_len,
        grad_accum=accum,
        checkpointing=settings.gradient_checkpointing,
        trainable=settings.trainable,
    )
    memory = plan_memory(shape, setup, teacher)
    toggled = plan_memory(shape, dataclasses.replace(setup, checkpointing=not setup.checkpointing), teacher)
    changes = []
    if target.memory is not None and memory.required > target.memory:
        per_machine = max(1, world // settings.num_machines)
        changes = smallest_changes(shape, setup, target.memory, teacher, per_machine)
    rate = measured[0] if measured is not None and measured[1] == device else None
    time, note = _time(settings, shape, teacher, target, world, steps * step_tokens, rate)
    return RunPlan(
        settings, shape, teacher, strategy, world, accum, steps, origin, step_tokens, target, memory,
        toggled, changes, time, note,
    )  # fmt: skip


def _time(
    settings: TrainSettings,
    shape: ModelShape,
    teacher: ModelShape | None,
    target: Target,
    world: int,
    tokens: int,
    measured: float | None,
) -> tuple[dict[str, Any] | None, str]:
    """From --tokens-per-second, else a measured step, else FLOPs at --mfu of the GPU's peak."""
    if settings.tokens_per_second is not None:
        return {**duration(tokens, settings.tokens_per_second, world), "source": "stated (--tokens-per-second)"}, ""
    if measured is not None:
        return {**duration(tokens, measured, world), "source": "measured: one step on this machine"}, ""
    if target.peak_flops is None:
        return None, (
            "no time estimate: name the GPU (--gpu h100, ...) for one from FLOPs, or state --tokens-per-second"
        )
    flops = flops_per_token(shape, settings.seq_len, settings.trainable, settings.gradient_checkpointing, teacher)
    rate = estimated_throughput(flops, target.peak_flops, settings.mfu)
    estimate = {
        **duration(tokens, rate, world),
        "source": f"estimate: {flops / 1e9:.2f} GFLOP per token at {settings.mfu:.0%} of {target.label}'s "
        f"{target.peak_flops / 1e12:.0f} TFLOP/s (dense bf16)",
        "flops_per_token": flops,
        "mfu": settings.mfu,
    }
    return estimate, ""


def _visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()
