"""Groupings: which kv heads form a group. A registry of Grouping objects; the CLI's choices, the
validation and the dispatch all come from it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from gqa_convert.surgery.calibration.linalg import Attention
from gqa_convert.surgery.calibration.sequential import LayerCalibration
from gqa_convert.surgery.calibration.similarity import groups_by_similarity

# (attention, the layer's calibration, kv heads after) -> the groups of one layer
ChooseGroupsFn = Callable[[Attention, LayerCalibration, int], tuple[tuple[int, ...], ...]]


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
            "per layer, the kv heads most alike after alignment merge (needs --calib-data)",
            groups_by_similarity,
        ),
    )
}
