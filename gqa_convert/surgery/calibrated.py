"""The calibrated pass: a loop over the layers that, per layer, takes the calibration's statistics,
chooses the groups (a calibrated grouping) and computes the merged attention (a calibrated method,
optionally refined), one layer in memory at a time. The merged tensors go to one small safetensors
file per layer; the streaming converter then reads them in place of the source's attention tensors."""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import save_file

from gqa_convert.arch import Layout, head_dim_of, rotary_dim
from gqa_convert.calibration import CalibrationStream, CalibrationText, LayerStatistics, calibration_ids
from gqa_convert.errors import GQAConvertError
from gqa_convert.io.sources import Checkpoint
from gqa_convert.surgery.aligned import ATTENDED_FOR, LayerInputs, attention_state, read_attention, rotary_pairs
from gqa_convert.surgery.aligned.refine import refine_layer
from gqa_convert.surgery.layouts import regroup_per_head, regroup_tensor
from gqa_convert.surgery.plan import HeadPlan, query_order_for
from gqa_convert.surgery.recipes import Recipe


def has_key_norm(checkpoint: Checkpoint) -> bool:
    """Whether K is normalised after its projection (no change of K commutes with that)."""
    arch = checkpoint.architecture
    prefix0 = arch.layer_prefix.format(layer=0)
    return any(name.startswith(prefix0 + norm) for name in checkpoint.tensors for norm in arch.key_norms)


def rope_pairs(checkpoint: Checkpoint) -> tuple[tuple[tuple[int, int], ...], int]:
    """The dimension pairs RoPE rotates together (then the non-rotary ones paired) and the rotary width."""
    hd = head_dim_of(checkpoint.config)
    rotary = rotary_dim(checkpoint.config, hd)
    return tuple(rotary_pairs(hd, rotary, checkpoint.architecture.rotary_interleaved)), rotary


def _check_supported(checkpoint: Checkpoint, recipe: Recipe) -> bool:
    """Refuse fused layouts; True when K is normalised after its projection (warned about)."""
    arch = checkpoint.architecture
    if recipe.merge_method.needs_calibration and arch.projections is None:
        raise GQAConvertError(
            f"recipe {recipe.name} (method {recipe.method}) needs separate q/k/v/o projections; "
            f"{arch.model_type} fuses them: use --recipe mean"
        )
    if recipe.head_grouping.needs_calibration and arch.projections is None:
        raise GQAConvertError(
            f"recipe {recipe.name} (grouping {recipe.grouping}) is not available for {arch.model_type} "
            "(fused projections): use a recipe with contiguous groups, e.g. --recipe mean"
        )
    key_norm = has_key_norm(checkpoint)
    if key_norm and recipe.merge_method.needs_calibration:
        warnings.warn(
            "this model normalises K after the projection, which a closed-form K merge cannot pass "
            "through: V is merged by the calibrated method, K by mean pooling",
            stacklevel=3,
        )
    return key_norm


def _progress() -> Progress:
    columns = (
        TextColumn("calibrating"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("layers"),
        TimeRemainingColumn(),
    )
    return Progress(*columns)


def source_kv_norms(checkpoint: Checkpoint, layer: int, plan: HeadPlan) -> dict[str, torch.Tensor]:
    """The kv-dependent tensors besides K/V (k norms) merged by the plan's rule and repeated back to
    the source's kv count, named inside the attention module: what the merged layer computes with."""
    arch = checkpoint.architecture
    prefix = arch.layer_prefix.format(layer=layer)
    module_prefix = arch.attention_module + "."
    projected = {f"{name}.{param}" for name in (arch.projections or {}).values() for param in ("weight", "bias")}
    back = {k: g for g, group in enumerate(plan.groups) for k in group}
    expand_plan = HeadPlan(plan.num_heads, plan.new_kv, tuple((back[k],) for k in range(plan.old_kv)), plan.head_dim)
    state = {}
    for entry in arch.kv_tensors:
        if entry.suffix in projected:
            continue
        if entry.layout == Layout.PER_HEAD:
            names = [prefix + entry.suffix.format(head=h) for h in range(plan.old_kv)]
            if names[0] not in checkpoint.tensors:
                continue
            merged = regroup_per_head(entry, [checkpoint.get(n).float() for n in names], plan, names[0])
            for head, tensor in enumerate(regroup_per_head(entry, merged, expand_plan, names[0])):
                state[entry.suffix.format(head=head).removeprefix(module_prefix)] = tensor
        elif prefix + entry.suffix in checkpoint.tensors:
            name = prefix + entry.suffix
            merged = regroup_tensor(entry, checkpoint.get(name).float(), plan, name)
            state[entry.suffix.removeprefix(module_prefix)] = regroup_tensor(entry, merged, expand_plan, name)
    return state


def _summary(layer: int, seconds: float, report: dict[str, Any]) -> str:
    parts = [f"layer {layer} ({seconds:.1f} s):"]
    if "keys" in report:
        band = f" (band of {report['band_pairs']} pairs)" if report.get("band_pairs") else ""
        parts.append(f"K {report['keys']}{band}")
    if "output_check" in report:
        before, after = report["output_check"]
        kept = f"kept (ridge {report['output_ridge']:g})" if report["output_solved"] else "not kept"
        parts.append(f"o_proj solve {kept} ({before:.4f} -> {after:.4f})")
    if "refine" in report:
        parts.append("refined ({}) {:.4g} -> {:.4g}".format(*report["refine"]))
    return " ".join(parts)


@dataclasses.dataclass(frozen=True)
class CalibratedLayers:
    """What the pass decided: per-layer plans, and the files holding the merged tensors."""

    plans: dict[int, HeadPlan]
    overrides: dict[str, Path]  # tensor name -> the file holding its merged value
    tokens: int  # the calibration tokens used (a text shorter than its share gives fewer)


def calibrate_layers(
    checkpoint: Checkpoint, base: HeadPlan, recipe: Recipe, text: CalibrationText, device: str, workdir: Path
) -> CalibratedLayers:
    """Per-layer plans (groups, query order) and, for a calibrated method, files of merged tensors."""
    key_norm = _check_supported(checkpoint, recipe)
    method, grouping = recipe.merge_method, recipe.head_grouping
    merging = method.merge_layer is not None
    settings = getattr(recipe, method.settings) if method.settings else None
    # nothing merged from calibration (a calibrated grouping alone): one stream, no attended moments
    attended = ATTENDED_FOR[recipe.aligned.value_moment] if merging else "none"
    sequential = merging and recipe.calibration.sequential
    ids = calibration_ids(checkpoint, text)
    pairs, rotary = rope_pairs(checkpoint)
    dtypes = {name: info.dtype for name, info in checkpoint.tensors.items()}
    plans: dict[int, HeadPlan] = {}
    overrides: dict[str, Path] = {}
    with _progress() as progress:
        task = progress.add_task("calibrate", total=int(checkpoint.config.num_hidden_layers))
        last = time.monotonic()  # when the previous layer was done
        stream = CalibrationStream(checkpoint, ids, device=device, sequential=sequential, attended=attended)
        for index in range(stream.num_layers):
            statistics = stream.collect(index)
            attention, names = read_attention(checkpoint, index, base)
            attention = attention.to(statistics.device)
            plan = base
            if grouping.choose is not None:
                groups = grouping.choose(attention, statistics, pairs, base.new_kv)
                plan = dataclasses.replace(base, groups=groups, query_order=query_order_for(groups, base.readers()))
            plans[index] = plan
            state = None
            if merging:
                kv_norms = source_kv_norms(checkpoint, index, plan) if key_norm else {}
                kv_norms = {k: v.to(statistics.device) for k, v in kv_norms.items()}
                inputs = LayerInputs(attention, statistics, plan, pairs, rotary, key_norm, kv_norms)
                merged = method.merge_layer(inputs, settings)
                # the per-head moments (34 GB for a 70B shape) are not needed by the refinement
                del inputs
                statistics = statistics.without_attended()
                tensors = merged.attention.grouped(plan.groups).to("cpu").as_tensors(names, dtypes.__getitem__)
                source_layout, report = merged.attention, dict(merged.report)
                if recipe.refine.steps:
                    tensors, source_layout, report["refine"] = _refine(
                        checkpoint, statistics, plan, names, tensors, recipe
                    )
                path = workdir / f"layer-{index:05d}.safetensors"
                save_file(tensors, path)
                overrides.update(dict.fromkeys(tensors, path))
                now = time.monotonic()  # the layer's whole work: its forwards, statistics, merge and refinement
                progress.console.log(_summary(index, now - last, report))
                last = now
                state = {**attention_state(source_layout, statistics.projections), **kv_norms}
            stream.advance(state)
            progress.advance(task)
    return CalibratedLayers(plans, overrides, ids.numel())


def _refine(
    checkpoint: Checkpoint,
    statistics: LayerStatistics,
    plan: HeadPlan,
    names: dict[str, str],
    tensors: dict[str, torch.Tensor],
    recipe: Recipe,
) -> tuple[dict[str, torch.Tensor], Any, tuple[str, float, float]]:
    arch = checkpoint.architecture
    prefix = arch.layer_prefix.format(layer=statistics.index) + arch.attention_module + "."
    query_dims = {q.suffix.split(".", 1)[1]: q.dim for q in arch.query_tensors}
    return refine_layer(statistics, tensors, plan, names, prefix, query_dims, recipe.refine)
