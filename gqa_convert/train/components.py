"""Small pieces every strategy shares: the optimizer and the batches."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from gqa_convert.data.tokens import TokenBlocks
from gqa_convert.train.settings import TrainPlan, TrainSettings


def build_optimizer(model: nn.Module, settings: TrainSettings, fused: bool = False) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)  # no decay on biases and norms
    groups = [{"params": decay, "weight_decay": settings.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # fused: one kernel for all parameters (what the HF Trainer uses); not with sharded (DTensor) parameters
    return torch.optim.AdamW(groups, lr=settings.lr, betas=(0.9, 0.95), eps=1e-8, fused=fused or None)


def micro_batch(blocks: TokenBlocks, plan: TrainPlan, step: int, micro: int, rank: int) -> torch.Tensor:
    """Block indices are laid out step-major, then micro-step, then rank: disjoint across ranks, and
    each step trains on the same blocks whatever the split into processes and micro-steps."""
    size, world = plan.settings.micro_batch_size, plan.world_size
    first = step * plan.global_batch + (micro * world + rank) * size
    return torch.from_numpy(np.stack([blocks.block(first + i) for i in range(size)]))


def open_blocks(plan: TrainPlan) -> TokenBlocks:
    return TokenBlocks(plan.train_tokens, plan.settings.seq_len, plan.settings.seed)
