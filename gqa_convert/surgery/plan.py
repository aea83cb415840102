"""A head plan: which old kv heads form each new kv head, by which merge, and in which order the query
heads end up (a permutation that changes nothing the model computes). It depends on nothing else of the
conversion: methods, layouts and the calibrated pass all build on it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from gqa_convert.arch import TensorKind


@dataclass(frozen=True)
class MergeContext:
    """What a merge may need beyond the heads themselves."""

    name: str  # the tensor's name: with the seed it makes random draws independent of order
    kind: TensorKind
    seed: int = 0
    init_std: float = 0.02  # the model's initializer_range


# (the stacked heads of one group, shape (g, *head_shape), context) -> one head
MergeFn = Callable[[torch.Tensor, MergeContext], torch.Tensor]


def only_head(heads: torch.Tensor, context: MergeContext) -> torch.Tensor:
    """A group of one (expand, or kv counts kept): the head itself."""
    return heads[0].clone()


@dataclass(frozen=True)
class HeadPlan:
    """New kv head n is made from old kv heads groups[n] by `merge` (groups of one are copies)."""

    num_heads: int
    old_kv: int
    groups: tuple[tuple[int, ...], ...]
    head_dim: int
    merge: MergeFn = only_head
    seed: int = 0
    init_std: float = 0.02
    # query_order[j] = the source query head that becomes query head j (None: unchanged)
    query_order: tuple[int, ...] | None = field(default=None)

    @property
    def new_kv(self) -> int:
        return len(self.groups)

    def readers(self) -> dict[int, list[int]]:
        """Source kv head -> the source query heads that read it (transformers' contiguous rule)."""
        per = self.num_heads // self.old_kv
        return {k: list(range(k * per, (k + 1) * per)) for k in range(self.old_kv)}

    def inverse_query_order(self) -> tuple[int, ...] | None:
        if self.query_order is None:
            return None
        inverse = [0] * self.num_heads
        for position, head in enumerate(self.query_order):
            inverse[head] = position
        return tuple(inverse)


def contiguous_groups(old_kv: int, new_kv: int) -> tuple[tuple[int, ...], ...]:
    """transformers' rule: query head j reads kv head j // (nh / nkv), so groups are contiguous."""
    size = old_kv // new_kv
    return tuple(tuple(range(g * size, (g + 1) * size)) for g in range(new_kv))


def expand_groups(old_kv: int, num_heads: int) -> tuple[tuple[int, ...], ...]:
    """Exact MHA: query head j gets a copy of the kv head it read."""
    return tuple((j // (num_heads // old_kv),) for j in range(num_heads))


def query_order_for(groups: tuple[tuple[int, ...], ...], readers: dict[int, list[int]]) -> tuple[int, ...]:
    """The query order under which transformers' contiguous rule reads `groups`: each group's readers."""
    return tuple(q for group in groups for k in group for q in readers[k])
