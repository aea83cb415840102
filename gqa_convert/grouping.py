"""Groupings: which source kv heads merge into each new kv head. A registry; the CLI lists its keys.

A grouping returns, for each new kv head, the tuple of source kv heads it merges. Groups have equal
size. Any grouping other than contiguous must also permute the query heads (see regroup.HeadPlan).
"""

from __future__ import annotations

from typing import Callable

from gqa_convert.checkpoint import Checkpoint
from gqa_convert.regroup import contiguous_groups

GroupingFn = Callable[[Checkpoint, int], tuple[tuple[int, ...], ...]]


def group_contiguous(checkpoint: Checkpoint, kv_heads: int) -> tuple[tuple[int, ...], ...]:
    """The rule transformers applies: kv heads [0..g), [g..2g), ... merge, g = old_kv / kv_heads."""
    return contiguous_groups(checkpoint.kv_heads(), kv_heads)


GROUPINGS: dict[str, GroupingFn] = {"contiguous": group_contiguous}
