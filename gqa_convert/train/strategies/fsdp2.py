"""fsdp2: torch's fully_shard on each decoder layer and on the root (embeddings, final norm, head):
parameters, gradients and optimizer state split over the processes; on GPUs bf16 compute over fp32
sharded master weights (MixedPrecisionPolicy). The same code on CPU (gloo) and GPU (nccl). The frozen
teacher is sharded the same way, stored in its compute dtype. Checkpoints: as ddp's (one format)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from gqa_convert.train.losses import Head, head_of
from gqa_convert.train.strategies.ddp import DataParallel
from gqa_convert.train.strategies.loading import decoder_layers


class FullyShard(DataParallel):
    fused_optimizer = False

    def prepare(self) -> None:
        from torch.distributed.device_mesh import init_device_mesh

        self.mesh = init_device_mesh(self.runtime.device.type, (self.runtime.world,))
        super().prepare()

    def student_layout(self, root: nn.Module) -> None:
        from torch.distributed.fsdp import MixedPrecisionPolicy

        super().student_layout(root)
        if self.plan.precision == "bf16":  # bf16 compute and gathers, fp32 master weights and reductions
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
