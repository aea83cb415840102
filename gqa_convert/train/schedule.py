"""The learning-rate schedule: linear warmup, then cosine decay to lr x min_lr_ratio at the last step."""

from __future__ import annotations

import math


def learning_rate(step: int, total_steps: int, lr: float, min_lr_ratio: float, warmup_steps: int | None) -> float:
    """The rate of optimizer step `step` (counted from 0). Warmup defaults to 2% of the steps, at least 1."""
    total = max(1, total_steps)
    warmup = warmup_steps if warmup_steps is not None else max(1, round(0.02 * total))
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = lr * min_lr_ratio
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
