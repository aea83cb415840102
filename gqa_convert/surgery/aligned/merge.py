"""The calibrated merge (method `aligned`) of one layer: closed-form least-squares merges of each
group's K and V heads that keep what the heads compute, the per-head maps absorbed into the query and
output projections (which stay per query head, so they are free to change), then a joint o_proj solve.

- K (keys.py): the complex per-pair merge, or (key_merge: frequency) per layer the best on the
  calibration windows of: the complex merge, the low band merged as a linear map with the
  projection gauge, or with the polar gauge (K-only attention error: V kept, the source's outputs as
  the target). With a norm on K after the projection no change of K commutes with it: K is mean-pooled.
- V (values.py): the shared V projection from the head-averaged attended (or plain) moment, o blocks
  absorbing it; with per-head moments, then refined by alternating the o blocks and the shared V.
- o_proj (output.py): with a ridge chosen per layer, all o blocks solved jointly against the source's
  attention outputs, kept only if that improves the held-out calibration batches.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch

from gqa_convert.surgery.aligned.attention import Attention, LayerInputs
from gqa_convert.surgery.aligned.keys import GAUGES, key_moment, merge_band, merge_keys_complex, pair_rotations
from gqa_convert.surgery.aligned.linalg import repeat_by_group
from gqa_convert.surgery.aligned.output import solve_output
from gqa_convert.surgery.aligned.settings import AlignedSettings
from gqa_convert.surgery.aligned.trials import attention_error, attention_state, output_moments
from gqa_convert.surgery.aligned.values import merge_values

TRIAL_BATCHES = 1  # calibration batches (of 4 windows) on which the K candidates are ranked
# the recipe's value_moment -> the attended moments the calibration collects for it
ATTENDED_FOR = {"per-head": "per-head", "attended": "averaged", "plain": "none"}


@dataclass(frozen=True)
class MergedLayer:
    """The merged attention in the source's layout: each group's merged K/V head repeated to every
    member of the group (the same function as the merged layer), q and o in source order."""

    attention: Attention
    report: dict[str, Any]


def _mean_keys(attention: Attention, groups) -> torch.Tensor:
    return torch.stack([attention.k[list(group)].mean(0) for group in groups])


def merge_key_side(inputs: LayerInputs, settings: AlignedSettings) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """New K heads (G, hd, d), new query heads, and what was chosen."""
    attention, statistics, groups, readers = inputs.attention, inputs.statistics, inputs.groups, inputs.readers
    if inputs.key_norm:
        return _mean_keys(attention, groups), attention.q, {"keys": "mean (K is normalised)"}
    pairs = list(inputs.pairs)
    complex_merge = merge_keys_complex(attention, statistics.moment, groups, readers, pairs)
    if settings.key_merge == "complex":
        return *complex_merge, {"keys": "complex"}
    rotations = pair_rotations(statistics.calls[0][1], pairs, inputs.rotary_dim)
    band = [pair for pair, angle in zip(pairs, rotations.tolist()) if angle <= settings.band_angle]
    if not band:
        return *complex_merge, {"keys": "complex", "band_pairs": 0}
    moments = (statistics.moment, key_moment(statistics.moment, statistics.mean, statistics.tokens, attention.k_bias))
    candidates = {"complex": complex_merge}
    for gauge in GAUGES:
        candidates[gauge] = merge_band(attention, moments, groups, readers, band, complex_merge, gauge)
    errors = {}
    for name, (k, q) in candidates.items():
        trial = replace(attention, q=q, k=repeat_by_group(k, groups, len(attention.k)))
        errors[name] = attention_error(inputs, attention_state(trial, statistics.projections), TRIAL_BATCHES)
    best = min(errors, key=errors.__getitem__)
    report = {"keys": best, "band_pairs": len(band), "key_errors": {n: round(e, 5) for n, e in errors.items()}}
    return *candidates[best], report


def merge_value_side(inputs: LayerInputs, settings: AlignedSettings) -> tuple[torch.Tensor, torch.Tensor]:
    """New V heads (G, hd, d) and new o_proj blocks (d_out, nh, hd)."""
    attention, statistics, groups, readers = inputs.attention, inputs.statistics, inputs.groups, inputs.readers
    if settings.value_moment == "plain":
        return merge_values(attention, statistics.moment, groups, readers)
    assert statistics.attended is not None, "the calibration did not collect the attended moments"
    if settings.value_moment == "attended":
        return merge_values(attention, statistics.attended, groups, readers)
    assert statistics.attended_per_head is not None, "the calibration did not collect the per-head moments"
    return merge_values(attention, statistics.attended, groups, readers, statistics.attended_per_head)


def solve_output_side(
    merged: Attention, inputs: LayerInputs, ridges: tuple[float, ...]
) -> tuple[Attention, dict[str, Any]]:
    """All o blocks solved jointly against the source's attention outputs, the merged q/k/v fixed."""
    projections = inputs.statistics.projections
    moments = output_moments(inputs, attention_state(merged, projections), projections["o"])
    o0 = merged.o.reshape(merged.o.shape[0], -1)
    o, before, after, ridge = solve_output(o0, moments, ridges)
    report = {"output_check": [round(before, 5), round(after, 5)], "output_solved": after < before}
    report["output_ridge"] = ridge
    return replace(merged, o=o.reshape(merged.o.shape)), report


def aligned_merge(inputs: LayerInputs, settings: AlignedSettings) -> MergedLayer:
    """The whole layer (see the module docstring): V, then K, then the o_proj solve."""
    attention, groups = inputs.attention, inputs.groups
    new_v, o = merge_value_side(inputs, settings)
    v = repeat_by_group(new_v, groups, len(attention.v))
    new_k, q, report = merge_key_side(inputs, settings)
    k = repeat_by_group(new_k, groups, len(attention.k))
    merged = replace(attention, q=q, k=k, v=v, o=o)
    if settings.output_ridges is not None:
        merged, output_report = solve_output_side(merged, inputs, settings.output_ridges)
        report.update(output_report)
    return MergedLayer(merged, report)


# (the layer's inputs, the recipe's section of the method) -> the merged layer
LayerMergeFn = Callable[[LayerInputs, Any], MergedLayer]
