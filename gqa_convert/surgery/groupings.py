"""Groupings: which kv heads form a group. A registry of Grouping objects; the recipes' choices, the
validation and the dispatch all come from it."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from gqa_convert.calibration import LayerStatistics
from gqa_convert.surgery.aligned.attention import Attention
from gqa_convert.surgery.aligned.similarity import groups_by_similarity

# (the layer's attention, its statistics, its RoPE pairs, kv heads after) -> the groups of one layer
ChooseGroupsFn = Callable[[Attention, LayerStatistics, Sequence[tuple[int, int]], int], tuple[tuple[int, ...], ...]]


@dataclass(frozen=True)
class Grouping:
    name: str
    help: str
    choose: ChooseGroupsFn | None = None  # per layer, from calibration; None: contiguous groups

    @property
    def needs_calibration(self) -> bool:
        return self.choose is not None


GROUPINGS: dict[str, Grouping] = {
    grouping.name: grouping
    for grouping in (
        Grouping("contiguous", "kv heads [0..g), [g..2g), ... merge (transformers' rule; no calibration)"),
        Grouping(
            "similarity",
            "per layer, the kv heads most alike after alignment merge (calibrated)",
            groups_by_similarity,
        ),
    )
}
