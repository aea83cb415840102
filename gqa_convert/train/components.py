"""The pieces a training worker builds: accelerator, model, optimizer, teacher, batches, losses."""

from __future__ import annotations

import datetime
from typing import Any

import numpy as np
import torch

from gqa_convert.arch import architecture_for
from gqa_convert.data.tokens import TokenBlocks
from gqa_convert.errors import GQAConvertError
from gqa_convert.io.sources import load_causal_lm
from gqa_convert.train.settings import TrainPlan, TrainSettings, resolve_precision

# Plain data parallel (or none): the optimizer may use the fused kernel (not with DTensor parameters).
UNSHARDED = ("NO", "MULTI_GPU", "MULTI_CPU")


def build_accelerator(plan: TrainPlan) -> Any:
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    settings = plan.settings
    log_with = None if settings.report_to == "none" else settings.report_to
    # collectives wait on the slowest process (a large checkpoint, the final export) up to --timeout-minutes
    waits = InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=settings.timeout_minutes))
    accelerator = Accelerator(
        kwargs_handlers=[waits],
        cpu=not torch.cuda.is_available(),
        mixed_precision=resolve_precision(settings.mixed_precision),
        log_with=log_with,
        project_dir=settings.out,
        gradient_accumulation_steps=plan.grad_accum,
        step_scheduler_with_optimizer=False,
    )
    if accelerator.num_processes != plan.world_size:
        # accelerate without cpu=True, or a mismatched YAML, silently runs N copies of world 1
        raise GQAConvertError(
            f"asked for {plan.world_size} processes but Accelerate runs {accelerator.num_processes}: "
            "check the launch settings"
        )
    return accelerator


def attention_prefixes(model: Any) -> list[str]:
    """The attention module of each layer, from the architecture table (q/k/v/o and their norms)."""
    arch = architecture_for(model.config.to_dict())
    return [
        arch.layer_prefix.format(layer=i) + arch.attention_module + "." for i in range(model.config.num_hidden_layers)
    ]


def build_model(settings: TrainSettings) -> Any:
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    model = load_causal_lm(settings.model, dtype=torch.float32)  # fp32 master weights
    model.config.use_cache = False
    if settings.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    if settings.trainable == "attention":
        attention = attention_prefixes(model)
        for name, parameter in model.named_parameters():
            parameter.requires_grad = any(name.startswith(prefix) for prefix in attention)
    return model


def build_teacher(settings: TrainSettings, accelerator: Any) -> Any:
    """The frozen teacher, sharded like the student under FSDP/DeepSpeed, else placed on the device."""
    if settings.teacher is None:
        return None
    teacher = load_causal_lm(settings.teacher, dtype=torch.float32)
    teacher.eval().requires_grad_(False)
    if accelerator.distributed_type.value in ("FSDP", "DEEPSPEED"):
        return accelerator.prepare(teacher)
    return teacher.to(accelerator.device)


def build_optimizer(model: Any, settings: TrainSettings, fused: bool = False) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)  # no decay on biases and norms
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all parameters (what the HF Trainer uses); not with sharded (DTensor) parameters
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def micro_batch(blocks: TokenBlocks, plan: TrainPlan, step: int, micro: int, rank: int) -> torch.Tensor:
    """Block indices are laid out step-major, then micro-step, then rank: disjoint across ranks."""
    size, world = plan.settings.micro_batch_size, plan.world_size
    per_step = size * world * plan.grad_accum
    first = step * per_step + (micro * world + rank) * size
    return torch.from_numpy(np.stack([blocks.block(first + i) for i in range(size)]))


def open_blocks(plan: TrainPlan) -> TokenBlocks:
    return TokenBlocks(plan.train_tokens, plan.settings.seq_len, plan.settings.seed)


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T^2 KL(teacher || student) per predicted position, averaged (Hinton et al.'s scaling)."""
    student = torch.log_softmax(student_logits[:, :-1].float() / temperature, dim=-1)
    teacher = torch.log_softmax(teacher_logits[:, :-1].float() / temperature, dim=-1)
    kl = torch.nn.functional.kl_div(
        student.flatten(0, 1), teacher.flatten(0, 1), log_target=True, reduction="batchmean"
    )
    return kl * temperature**2
