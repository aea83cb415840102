"""Merge methods: how the kv heads of one group become one kv head. A registry of Method objects;
the CLI's choices, the validation and the dispatch all come from it.

A method's `merge` gets the stacked heads of a group, shape (g, *head_shape), and returns one head;
`kind` says what the tensor is (weight, bias, norm scale, norm bias) for methods that do not look at
the values. A calibrated method also has `merge_layer`, which merges a whole layer's attention from
the layer's inputs (plan, calibration statistics) and the recipe section named by `settings`; its
`merge` covers what that does not (kv-dependent norms). Adding a method is adding an entry here (and,
for a calibrated one with settings of its own, a recipe section: gqa_convert.surgery.recipes).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import torch

from gqa_convert.arch import TensorKind
from gqa_convert.surgery.aligned import aligned_merge
from gqa_convert.surgery.aligned.merge import LayerMergeFn
from gqa_convert.surgery.plan import MergeContext, MergeFn


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
    if context.kind == TensorKind.NORM:
        return torch.ones(shape, dtype=dtype)
    if context.kind in (TensorKind.BIAS, TensorKind.NORM_BIAS):
        return torch.zeros(shape, dtype=dtype)
    assert context.kind == TensorKind.WEIGHT, context.kind
    digest = hashlib.sha256(f"{context.seed}:{context.name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return (torch.randn(shape, generator=generator) * context.init_std).to(dtype)


@dataclass(frozen=True)
class Method:
    name: str
    help: str
    merge: MergeFn
    merge_layer: LayerMergeFn | None = None  # calibrated: a whole layer from calibration statistics
    settings: str | None = None  # the recipe section merge_layer reads (and refinement applies to it)

    @property
    def needs_calibration(self) -> bool:
        return self.merge_layer is not None


METHODS: dict[str, Method] = {
    method.name: method
    for method in (
        Method("mean", "the GQA paper's rule: the mean of each group's heads", merge_mean),
        Method("first", "keep each group's first head (the paper's ablation)", merge_first),
        Method(
            "random", "fresh heads drawn like the model's init, seeded by --seed (the paper's ablation)", merge_random
        ),
        Method(
            "aligned",
            "calibrated merge: K and V fitted to what the heads compute on calibration text, then o_proj",
            merge_mean,
            aligned_merge,
            settings="aligned",
        ),
    )
}
