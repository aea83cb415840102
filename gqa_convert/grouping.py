"""Groupings: which source kv heads merge into each new kv head. A registry; the CLI lists its keys.

Groups have equal size. `contiguous` is transformers' own rule and needs nothing; `similarity` picks,
per layer, the heads that merge best from calibration statistics (gqa_convert.calibrated), and the
query heads are then permuted (q rows, q bias, o_proj columns) so that the contiguous rule applies:
the permutation itself changes nothing the model computes.
"""

from __future__ import annotations

GROUPINGS: dict[str, str] = {
    "contiguous": "kv heads [0..g), [g..2g), ... merge (transformers' rule; no calibration)",
    "similarity": "per layer, the kv heads most alike after alignment merge (needs --calib-data)",
}
NEEDS_CALIBRATION = {"similarity"}
