"""ddp: every process holds the whole model (DistributedDataParallel when there are several), with
autocast for mixed precision on GPUs; and the defaults the other strategies override.

Checkpoints go through torch.distributed.checkpoint with gqa-convert's storage (safetensors pieces and
a JSON index, train.checkpoint.storage): each process writes its part, nothing is gathered, and a
checkpoint loads onto another number of processes or under fsdp2. Only tensors are stored: the
optimizer's hyperparameters are the run's (a resumed run may change --lr or --weight-decay).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from gqa_convert.train.checkpoint.storage import load_tensors, save_tensors
from gqa_convert.train.losses import CausalLMWithChunkedLoss, FrozenTeacher, Head, head_of
from gqa_convert.train.plan import TrainPlan
from gqa_convert.train.runtime import Runtime
from gqa_convert.train.strategies.loading import (
    build_optimizer,
    compile_blocks,
    empty_causal_lm,
    freeze_all_but_attention,
    load_into,
    set_hyperparameters,
)


class DataParallel:
    fused_optimizer = True  # one kernel over every parameter; not for sharded (DTensor) parameters

    def __init__(self, runtime: Runtime, plan: TrainPlan) -> None:
        self.runtime, self.plan, self.settings = runtime, plan, plan.settings
        self.teacher: nn.Module | None = None
        self.scaler = None

    # ---- building: the one place the run's models and optimizer are made ----
    def prepare(self) -> None:
        self.student = self._load(self.settings.model, CausalLMWithChunkedLoss, torch.float32, self.student_layout)
        if self.settings.teacher is not None:
            dtype = torch.bfloat16 if self.plan.precision == "bf16" else torch.float32
            self.teacher = self._load(self.settings.teacher, FrozenTeacher, dtype, self.teacher_layout)
        self.optimizer = build_optimizer(
            self.student, self.settings.weight_decay, self.settings.lr, fused=self.fused_optimizer
        )
        self.model = self.wrap(self.student)
        if self.plan.precision == "fp16":
            self.scaler = torch.amp.GradScaler("cuda")

    def _load(self, source: str, root_class: type, dtype: torch.dtype, layout: Any) -> nn.Module:
        return load_into(source, root_class(empty_causal_lm(source, dtype)), self.runtime.device, layout)

    def student_layout(self, root: nn.Module) -> None:
        """On the meta model, before parameters are allocated: what trains, checkpointing."""
        if self.settings.trainable == "attention":
            freeze_all_but_attention(root.causal_lm)
        if self.settings.gradient_checkpointing:
            root.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if self.compiles():
            compile_blocks(root.causal_lm)

    def compiles(self) -> bool:
        """--compile: auto compiles on GPUs only (on CPU compiling costs more than a short run saves)."""
        if self.settings.compile == "auto":
            return self.runtime.device.type == "cuda"
        return self.settings.compile == "on"

    def teacher_layout(self, root: nn.Module) -> None:
        pass

    def wrap(self, student: nn.Module) -> nn.Module:
        if self.runtime.world == 1:
            return student
        device_ids = [self.runtime.device.index] if self.runtime.device.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(student, device_ids=device_ids)

    # ---- one optimizer step ----
    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        """Gradients are reduced on the last micro-step only."""
        if last or not isinstance(self.model, nn.parallel.DistributedDataParallel):
            return contextlib.nullcontext()
        return self.model.no_sync()

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.runtime.device.type != "cuda" or self.plan.precision == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.plan.precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    @contextlib.contextmanager
    def teacher_head(self) -> Iterator[Head]:
        """The teacher's output head, whole, while the loss reads it (after the teacher's forward)."""
        yield head_of(self.teacher.causal_lm)

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.plan.grad_accum
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> torch.Tensor | float | None:
        """Clip (the norm over every shard), step, zero; returns the norm before clipping (a tensor on
        the device: reading it waits for the step, which the loop leaves for later)."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        clip = self.settings.grad_clip
        trainable = [p for p in self.student.parameters() if p.requires_grad]
        norm = torch.nn.utils.clip_grad_norm_(trainable, clip if clip > 0 else float("inf"))
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.detach()

    def set_hyperparameters(self, lr: float) -> None:
        set_hyperparameters(self.optimizer, lr, self.settings.weight_decay)

    def after_eval(self) -> None:
        pass

    # ---- checkpoints ----
    def _state(self) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """The tensors to checkpoint (model, and optimizer state per parameter), and the optimizer's
        parameter groups (hyperparameters: the run's own, never read back)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state["state"]}, optimizer_state["param_groups"]

    def save_state(self, folder: Path) -> None:
        save_tensors(self._state()[0], folder)

    def load_state(self, folder: Path) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state, groups = self._state()
        load_tensors(state, folder)
        optimizer_state = {"state": state["optimizer"], "param_groups": groups}
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=optimizer_state)

    # ---- export ----
    def export_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """The parameters themselves (sharded: nothing gathered); lm_head left out when tied to the
        embeddings (transformers re-ties it on load)."""
        causal_lm = self.student.causal_lm
        tied = bool(getattr(causal_lm.config, "tie_word_embeddings", False))
        state = causal_lm.state_dict(keep_vars=True)
        return [(name, tensor) for name, tensor in state.items() if not (tied and name == "lm_head.weight")]

    def full_shape(self, tensor: torch.Tensor) -> tuple[int, ...]:
        return tuple(tensor.shape)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The whole tensor (a collective for sharded tensors: every rank calls it, in the same order)."""
        return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

    # ---- report ----
    def shares(self) -> dict[str, tuple[int, int]]:
        optimizer_state = [
            value
            for state in self.optimizer.state.values()
            for value in state.values()
            if isinstance(value, torch.Tensor) and value.dim() > 0
        ]
        shares = {
            "parameters": local_numel(self.student.parameters()),
            "optimizer state": local_numel(optimizer_state),
        }
        if self.teacher is not None:
            shares["teacher"] = local_numel(self.teacher.parameters())
        return shares


def local_numel(tensors: Any) -> tuple[int, int]:
    local = total = 0
    for tensor in tensors:
        local += tensor.to_local().numel() if isinstance(tensor, DTensor) else tensor.numel()
        total += tensor.numel()  # a DTensor's numel is the global one
    return local, total
