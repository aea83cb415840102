"""The calibrated merge (`--method aligned`) of one layer: closed-form least-squares merges of each
group's K and V heads that keep what the heads compute, the per-head maps absorbed into the query and
output projections (which stay per query head, so they are free to change), then a joint o_proj solve.

- K (keys.py): the complex per-pair merge, or (key_merge "frequency") per layer the best on the
  calibration windows of: the complex merge, the low band merged as a linear map with the
  projection gauge, or with the polar gauge (K-only attention error: V kept, the source's outputs as
  the target). With a norm on K after the projection no change of K commutes with it: K is mean-pooled.
- V (values.py): the shared V projection from the head-averaged attended (or plain) moment, o blocks
  absorbing it; with per-head moments, then refined by alternating the o blocks and the shared V.
- o_proj (output.py): with a ridge chosen per layer, all o blocks solved jointly against the source's
  attention outputs, kept only if that improves the held-out calibration batches.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from dataclasses import dataclass, replace
from typing import Any

import torch

from gqa_convert.surgery.calibration.keys import GAUGES, key_moment, merge_band, merge_keys_complex, pair_rotations
from gqa_convert.surgery.calibration.linalg import Attention, Groups, Readers, repeat_by_group
from gqa_convert.surgery.calibration.output import solve_output
from gqa_convert.surgery.calibration.sequential import LayerCalibration
from gqa_convert.surgery.calibration.settings import Calibration
from gqa_convert.surgery.calibration.trials import attention_error, attention_state, output_moments
from gqa_convert.surgery.calibration.values import merge_values, shrink_moments_

TRIAL_BATCHES = 1  # calibration batches (of 4 windows) on which the K candidates are ranked


@dataclass
class MergedLayer:
    """The merged attention in the source's layout: each group's merged K/V head repeated to every
    member of the group (the same function as the merged layer), q and o in source order."""

    attention: Attention
    report: dict[str, Any]


def _mean_keys(attention: Attention, groups: Groups) -> torch.Tensor:
    return torch.stack([attention.k[list(group)].mean(0) for group in groups])


def _merge_keys(
    attention: Attention, layer: LayerCalibration, groups: Groups, readers: Readers, settings: Calibration
) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """New K heads (G, hd, d), new query heads, and what was chosen."""
    if layer.key_norm:
        return _mean_keys(attention, groups), attention.q, {"keys": "mean (K is normalised)"}
    complex_merge = merge_keys_complex(attention, layer.moment, groups, readers, layer.pairs)
    if settings.key_merge == "complex":
        return *complex_merge, {"keys": "complex"}
    rotations = pair_rotations(layer.calls[0][1], layer.pairs, layer.rotary_dim)
    band = [pair for pair, angle in zip(layer.pairs, rotations.tolist()) if angle <= settings.band_angle]
    if not band:
        return *complex_merge, {"keys": "complex", "band_pairs": 0}
    moments = (layer.moment, key_moment(layer.moment, layer.mean, layer.tokens, attention.k_bias))
    candidates = {"complex": complex_merge}
    for gauge in GAUGES:
        candidates[gauge] = merge_band(attention, moments, groups, readers, band, complex_merge, gauge)
    errors = {}
    for name, (k, q) in candidates.items():
        trial = replace(attention, q=q, k=repeat_by_group(k, groups, len(attention.k)))
        errors[name] = attention_error(layer, attention_state(trial, layer.projections), TRIAL_BATCHES)
    best = min(errors, key=errors.__getitem__)
    report = {"keys": best, "band_pairs": len(band), "key_errors": {n: round(e, 5) for n, e in errors.items()}}
    return *candidates[best], report


def _solve_output(
    merged: Attention, layer: LayerCalibration, ridges: tuple[float, ...]
) -> tuple[Attention, dict[str, Any]]:
    moments = output_moments(layer, attention_state(merged, layer.projections), layer.projections["o"])
    o0 = merged.o.reshape(merged.o.shape[0], -1)
    o, before, after, ridge = solve_output(o0, moments, ridges)
    report = {"output_check": [round(before, 5), round(after, 5)], "output_solved": after < before}
    report["output_ridge"] = ridge
    return replace(merged, o=o.reshape(merged.o.shape)), report


def aligned_merge(
    attention: Attention,
    layer: LayerCalibration,
    groups: Groups,
    readers: Readers,
    settings: Calibration,
    sides: Collection[str] = ("k", "v"),
) -> MergedLayer:
    """The whole layer (see the module docstring). `sides` ("k", "v") is for diagnostics: a side
    left out keeps the source's heads."""
    q, k, v, o = attention.q, attention.k, attention.v, attention.o
    report: dict[str, Any] = {}
    if "v" in sides:
        if settings.value_moment == "plain":
            new_v, o = merge_values(attention, layer.moment, groups, readers)
        elif settings.value_moment == "attended":
            assert layer.attended is not None
            new_v, o = merge_values(attention, layer.attended, groups, readers)
        else:
            assert layer.attended is not None
            average = layer.attended.mean(0)  # shrinking toward the average leaves the average as it is
            per_head = shrink_moments_(layer.attended, layer.tokens)
            new_v, o = merge_values(attention, average, groups, readers, per_head)
        v = repeat_by_group(new_v, groups, len(attention.v))
    if "k" in sides:
        new_k, q, key_report = _merge_keys(attention, layer, groups, readers, settings)
        k = repeat_by_group(new_k, groups, len(attention.k))
        report.update(key_report)
    merged = replace(attention, q=q, k=k, v=v, o=o)
    if settings.output_ridges is not None:
        merged, output_report = _solve_output(merged, layer, settings.output_ridges)
        report.update(output_report)
    return MergedLayer(merged, report)


# (source attention, layer calibration, groups, readers, settings) -> the merged layer
LayerMergeFn = Callable[[Attention, LayerCalibration, Groups, Readers, Calibration], MergedLayer]
