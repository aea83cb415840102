"""deepspeed: ZeRO-3 through Accelerate's DeepSpeed plugin, on GPUs, launched with a DEEPSPEED YAML.

Accelerate's prepare(model, optimizer) refuses to start without a DataLoader unless the DeepSpeed
config holds an integer micro-batch size, and it takes the accumulation steps from the DeepSpeed
config over its own: micro-batch, accumulation and clipping are written into the config from
gqa-convert's settings first. The student's head is used outside its module's forward (inside the
wrapper's chunked loss), so it is registered as an external parameter of the wrapper; the teacher is
its own ZeRO-3 inference engine (partitioned like the student, no optimizer). Checkpoints are
Accelerate's save_state: DeepSpeed's own partitioned files, which are pickles, so --resume loads them
only with --trust-deepspeed-checkpoint (train.checkpoint.choose_resume).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from gqa_convert.errors import GQAConvertError
from gqa_convert.io.sources import load_causal_lm
from gqa_convert.train.losses import CausalLMWithChunkedLoss, FrozenTeacher, Head, head_of
from gqa_convert.train.strategies.ddp import DataParallel
from gqa_convert.train.strategies.loading import build_optimizer


def configure_deepspeed(accelerator: Any, micro_batch: int, grad_accum: int, grad_clip: float) -> None:
    """Before accelerator.prepare(model, optimizer): the values a DataLoader would have given."""
    config = accelerator.state.deepspeed_plugin.deepspeed_config
    config["train_micro_batch_size_per_gpu"] = micro_batch
    config["gradient_accumulation_steps"] = grad_accum
    config["train_batch_size"] = micro_batch * grad_accum * accelerator.num_processes
    config["gradient_clipping"] = grad_clip  # DeepSpeed clips inside its step
    accelerator.gradient_accumulation_steps = grad_accum  # the launcher's environment may have set another


class DeepSpeedZero3(DataParallel):
    fused_optimizer = False

    def compiles(self) -> bool:
        """Not under ZeRO-3 (its partitioned parameters are swapped in by hooks; not tested compiled)."""
        if self.settings.compile == "on":
            raise GQAConvertError("--compile on is not supported by the deepspeed strategy: use --compile auto or off")
        return False

    def prepare(self) -> None:  # loads its own way
        import deepspeed

        accelerator = self.runtime.accelerator
        configure_deepspeed(accelerator, self.settings.micro_batch_size, self.plan.grad_accum, self.settings.grad_clip)
        student = CausalLMWithChunkedLoss(_load(self.settings.model, torch.float32))  # partitioned while loading
        self.student_layout(student)
        head = student.causal_lm.get_output_embeddings()
        for parameter in (head.weight, head.bias):
            if parameter is not None:
                deepspeed.zero.register_external_parameter(student, parameter)
        optimizer = build_optimizer(student, self.settings.weight_decay, self.settings.lr)
        self.model, self.optimizer = accelerator.prepare(student, optimizer)
        self.student = self.model.module  # DeepSpeed scales fp16 losses itself: no scaler
        if self.settings.teacher is not None:
            self.teacher = self._teacher_engine(accelerator)

    def _teacher_engine(self, accelerator: Any) -> Any:
        import deepspeed

        dtype = torch.bfloat16 if self.plan.precision == "bf16" else torch.float32
        teacher = FrozenTeacher(_load(self.settings.teacher, dtype))
        config = copy.deepcopy(accelerator.state.deepspeed_plugin.deepspeed_config)  # filled by prepare
        for key in ("optimizer", "scheduler"):
            config.pop(key, None)
        engine, *_ = deepspeed.initialize(model=teacher, config=config)
        engine.eval()
        return engine

    def micro_step(self, last: bool) -> contextlib.AbstractContextManager:
        # Accelerate counts micro-steps and tells the engine which one ends the accumulation
        return self.runtime.accelerator.accumulate(self.model)

    def autocast(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()  # the engine computes in the configured precision

    def backward(self, loss: torch.Tensor) -> None:
        self.runtime.accelerator.backward(loss)  # the engine divides by the accumulation steps and steps

    def step(self) -> torch.Tensor | float | None:
        self.optimizer.step()  # a no-op: the engine stepped at the end of the accumulation
        self.optimizer.zero_grad()
        norm = self.model.get_global_grad_norm()
        return None if norm is None else float(norm)

    @contextlib.contextmanager
    def teacher_head(self) -> Iterator[Head]:
        import deepspeed

        head = self.teacher.module.causal_lm.get_output_embeddings()
        parameters = [p for p in (head.weight, head.bias) if p is not None]
        with deepspeed.zero.GatheredParameters(parameters, modifier_rank=None):
            yield head_of(self.teacher.module.causal_lm)

    def full_shape(self, tensor: torch.Tensor) -> tuple[int, ...]:
        return tuple(getattr(tensor, "ds_shape", tensor.shape))

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        import deepspeed

        if not hasattr(tensor, "ds_id"):  # a buffer: whole on every rank
            return tensor
        with deepspeed.zero.GatheredParameters([tensor], modifier_rank=None):
            return tensor.detach().to("cpu", copy=True) if self.runtime.is_main else torch.empty(0)

    def save_state(self, folder: Path) -> None:
        self.runtime.accelerator.save_state(str(folder))

    def load_state(self, folder: Path) -> None:
        self.runtime.accelerator.load_state(str(folder))

    def shares(self) -> dict[str, tuple[int, int]]:
        shares = {"parameters": _partitioned(self.student.parameters())}
        if self.teacher is not None:
            shares["teacher"] = _partitioned(self.teacher.module.parameters())
        return shares


def _load(source: str, dtype: torch.dtype) -> Any:
    """Under zero3_init_flag transformers partitions the model while it loads it."""
    model = load_causal_lm(source, dtype=dtype)
    model.config.use_cache = False
    return model


def _partitioned(parameters: Any) -> tuple[int, int]:
    local = total = 0
    for parameter in parameters:
        local += parameter.ds_tensor.numel() if hasattr(parameter, "ds_tensor") else parameter.numel()
        total += getattr(parameter, "ds_numel", parameter.numel())
    return local, total
