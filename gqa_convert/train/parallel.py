"""The strategies behind one interface used by the loop, checkpoints and export:

    ddp        every process holds the whole model (DistributedDataParallel when there are several);
               autocast for mixed precision on GPUs
    fsdp2      torch's fully_shard on each decoder layer and on the root: parameters, gradients and
               optimizer state split over the processes; on GPUs bf16 compute over fp32 sharded master
               weights (MixedPrecisionPolicy). The same code on CPU (gloo) and GPU (nccl)
    deepspeed  ZeRO-3 through Accelerate's DeepSpeed plugin (train.deepspeed_zero3)

Models are loaded by train.loading (rank 0 reads, the others receive). The frozen teacher is laid out
like the student (sharded under fsdp2), stored in bf16 when training in bf16. ddp and fsdp2 checkpoint
with torch.distributed.checkpoint (one file per rank, resharded on load onto another world size).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from gqa_convert.train.components import build_optimizer
from gqa_convert.train.loading import decoder_layers, empty_causal_lm, freeze_all_but_attention, load_into
from gqa_convert.train.losses import Head
from gqa_convert.train.modules import CausalLMWithChunkedLoss, FrozenTeacher, head_of
from gqa_convert.train.runtime import Runtime
from gqa_convert.train.settings import TrainPlan


class DataParallel:
    """ddp, and the defaults the other strategies override."""

    name = "ddp"
    checkpoint_format = "dcp"

    def __init__(self, runtime: Runtime, plan: TrainPlan) -> None:
        self.runtime, self.plan, self.settings = runtime, plan, plan.settings
        self.student = self._load(self.settings.model, CausalLMWithChunkedLoss, torch.float32, self.student_layout)
        self.teacher = None
        if self.settings.teacher is not None:
            dtype = torch.bfloat16 if runtime.precision == "bf16" else torch.float32
            self.teacher = self._load(self.settings.teacher, FrozenTeacher, dtype, self.teacher_layout)
        self.optimizer = build_optimizer(self.student, self.settings, fused=self.name == "ddp")
        self.model = self.wrap(self.student)
        self.scaler = torch.amp.GradScaler("cuda") if runtime.precision == "fp16" else None

    # ---- building ----
    def _load(self, source: str, root_class: type, dtype: torch.dtype, layout: Any) -> nn.Module:
        return load_into(source, root_class(empty_causal_lm(source, dtype)), self.runtime.device, layout)

    def student_layout(self, root: nn.Module) -> None:
        """On the meta model, before parameters are allocated: what trains, checkpointing."""
        if self.settings.trainable == "attention":
            freeze_all_but_attention(root.causal_lm)
        if self.settings.gradient_checkpointing:
            root.causal_lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

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
        if self.runtime.device.type != "cuda" or self.runtime.precision == "no":
            return contextlib.nullcontext()
        dtype = torch.bfloat16 if self.runtime.precision == "bf16" else torch.float16
        return torch.autocast("cuda", dtype=dtype)

    def backward(self, loss: torch.Tensor) -> None:
        loss = loss / self.plan.grad_accum
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> float | None:
        """Clip (the norm over every shard), step, zero; returns the norm before clipping."""
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
        return float(norm)

    def set_lr(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    @contextlib.contextmanager
    def teacher_head(self) -> Iterator[Head]:
        """The teacher's output head, whole, while the loss reads it (after the teacher's forward)."""
        yield head_of(self.teacher.causal_lm)

    def after_eval(self) -> None:
        pass

    # ---- export ----
    @property
    def causal_lm(self) -> Any:
        return self.student.causal_lm

    def full_shape(self, tensor: torch.Tensor) -> tuple[int, ...]:
        return tuple(tensor.shape)

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """The whole tensor (a collective for sharded tensors: every rank calls it, in the same order)."""
        return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor

    # ---- checkpoints ----
    def _dcp_state(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(self.model, self.optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def save_state(self, folder: Path) -> None:
        """Each rank writes its own shard file (__<rank>_0.distcp) and rank 0 the metadata."""
        import torch.distributed.checkpoint as dcp

        dcp.save(self._dcp_state(), checkpoint_id=str(folder))

    def load_state(self, folder: Path) -> None:
        """DCP reads what each rank needs, whatever the world size the checkpoint was written with."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        state = self._dcp_state()
        dcp.load(state, checkpoint_id=str(folder))
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])

    # ---- report ----
    def shares(self) -> dict[str, tuple[int, int]]:
        """(elements held by this process, elements in all) of the parameters, optimizer state, teacher."""
        optimizer_state = [
            value
            for state in self.optimizer.state.values()
            for value in state.values()
            if isinstance(value, torch.Tensor) and value.dim() > 0
        ]
        shares = {
            "parameters": _local_numel(self.student.parameters()),
            "optimizer state": _local_numel(optimizer_state),
        }
        if self.teacher is not None:
            shares["teacher"] = _local_numel(self.teacher.parameters())
        return shares


class FullyShard(DataParallel):
    """fsdp2: fully_shard per decoder layer, then on the root (embeddings, final norm, head)."""

    name = "fsdp2"

    def __init__(self, runtime: Runtime, plan: TrainPlan) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(runtime.device.type, (runtime.world,))
        super().__init__(runtime, plan)

    def student_layout(self, root: nn.Module) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        super().student_layout(root)
        if self.runtime.precision == "bf16":  # bf16 compute and gathers, fp32 master weights and reductions
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        else:
            policy = MixedPrecisionPolicy()
        self._shard(root, policy)

    def teacher_layout(self, root: nn.Module) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        self._shard(root, MixedPrecisionPolicy())  # stored in its compute dtype already

    def _shard(self, root: nn.Module, policy: Any) -> None:
        from torch.distributed.fsdp import fully_shard

        for layer in decoder_layers(root.causal_lm):
            fully_shard(layer, mesh=self.mesh, mp_policy=policy)
        fully_shard(root, mesh=self.mesh, mp_policy=policy)

    def wrap(self, student: nn.Module) -> nn.Module:
        return student  # sharded while loading

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        # gradients are reduce-scattered after every micro-step and accumulate in their shards: skipping
        # the reduction would hold every layer's whole gradient until the last one (no sharding left)
        return contextlib.nullcontext()

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the MixedPrecisionPolicy casts

    @contextlib.contextmanager
    def teacher_head(self) -> Iterator[Head]:
        # after a forward without backward, the teacher's root keeps its gathered parameters until
        # reshard(); the chunked loss needs them only during the student's forward
        try:
            yield head_of(self.teacher.causal_lm)
        finally:
            self.teacher.reshard()

    def after_eval(self) -> None:
        self.model.reshard()  # the root keeps its gathered parameters after a forward without backward


def _local_numel(tensors: Any) -> tuple[int, int]:
    local = total = 0
    for tensor in tensors:
        local += tensor.to_local().numel() if isinstance(tensor, DTensor) else tensor.numel()
        total += tensor.numel()  # a DTensor's numel is the global one
    return local, total
