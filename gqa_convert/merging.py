"""Merge methods: how the kv heads of one group become one kv head. A registry; the CLI lists its keys.

A method gets the stacked heads of a group, shape (g, *head_shape), and returns one head. `kind` says
what the tensor is (weight, bias, norm scale, norm bias) for methods that do not look at the values.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Callable

import torch

from gqa_convert.architectures import BIAS, NORM, NORM_BIAS, WEIGHT


@dataclass(frozen=True)
class MergeContext:
    """What a method may need beyond the heads themselves."""

    name: str  # the tensor's name: with the seed it makes random draws independent of order
    kind: str
    seed: int = 0
    init_std: float = 0.02  # the model's initializer_range


MergeFn = Callable[[torch.Tensor, MergeContext], torch.Tensor]


def merge_mean(heads: torch.Tensor, context: MergeContext) -> torch.Tensor:
    """The GQA paper's rule: the mean of the group's heads (computed in float32)."""
    return heads.float().mean(dim=0).to(heads.dtype)


def merge_first(heads: torch.Tensor, context: MergeContext) -> torch.Tensor:
    """The paper's ablation: keep the group's first head."""
    return heads[0].clone()


def merge_random(heads: torch.Tensor, context: MergeContext) -> torch.Tensor:
    """The paper's ablation: a fresh head, initialised as the model's own init would (seeded)."""
    shape, dtype = heads.shape[1:], heads.dtype
    if heads.is_meta:
        return torch.empty(shape, dtype=dtype, device="meta")
    if context.kind == NORM:
        return torch.ones(shape, dtype=dtype)
    if context.kind in (BIAS, NORM_BIAS):
        return torch.zeros(shape, dtype=dtype)
    assert context.kind == WEIGHT, context.kind
    digest = hashlib.sha256(f"{context.seed}:{context.name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return (torch.randn(shape, generator=generator) * context.init_std).to(dtype)


METHODS: dict[str, MergeFn] = {"mean": merge_mean, "first": merge_first, "random": merge_random}


# Methods that need calibration activations: computed per layer by gqa_convert.calibrated, which
# writes the merged tensors the converter then uses. Tensors they do not cover (kv-dependent norms)
# are merged by `mean`.
CALIBRATED_METHODS: dict[str, str] = {
    "aligned": "closed-form least-squares merge from calibration activations, RoPE-aware (needs --calib-data)",
}
