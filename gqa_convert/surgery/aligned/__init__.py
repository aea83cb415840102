"""The calibrated merge (method `aligned`) and what builds on it: similarity grouping and refinement.

Each consumes a head plan and one layer's calibration statistics (gqa_convert.calibration) and
returns weights; none collects statistics itself. The public names below are the seam research code
uses (scripts/research/merge_diagnostic.py merges one side of each layer with them).
"""

from gqa_convert.surgery.aligned.attention import Attention, LayerInputs, attention_from, read_attention
from gqa_convert.surgery.aligned.keys import rotary_pairs
from gqa_convert.surgery.aligned.linalg import repeat_by_group
from gqa_convert.surgery.aligned.merge import (
    ATTENDED_FOR,
    MergedLayer,
    aligned_merge,
    merge_key_side,
    merge_value_side,
    solve_output_side,
)
from gqa_convert.surgery.aligned.settings import AlignedSettings, RefineSettings
from gqa_convert.surgery.aligned.trials import attention_state

__all__ = [
    "ATTENDED_FOR",
    "AlignedSettings",
    "Attention",
    "LayerInputs",
    "MergedLayer",
    "RefineSettings",
    "aligned_merge",
    "attention_from",
    "attention_state",
    "merge_key_side",
    "merge_value_side",
    "read_attention",
    "repeat_by_group",
    "rotary_pairs",
    "solve_output_side",
]
