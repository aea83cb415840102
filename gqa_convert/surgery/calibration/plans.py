"""The calibrated pass: per layer, choose the groups (a calibrated grouping) and compute the merged
attention (a calibrated method, optionally refined), one layer in memory at a time. The merged tensors
go to one small safetensors file per layer; the streaming converter then reads them in place of the
source's attention tensors."""

from __future__ import annotations

import dataclasses
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import save_file

from gqa_convert.arch import Layout
from gqa_convert.errors import GQAConvertError
from gqa_convert.io.sources import Checkpoint
from gqa_convert.surgery.calibration.activations import calibration_ids
from gqa_convert.surgery.calibration.linalg import Attention, Groups, first_of_group, repeat_by_group
from gqa_convert.surgery.calibration.refine import refine
from gqa_convert.surgery.calibration.sequential import LayerCalibration, run_layers
from gqa_convert.surgery.calibration.settings import Calibration
from gqa_convert.surgery.calibration.trials import attention_state
from gqa_convert.surgery.groupings import Grouping
from gqa_convert.surgery.layouts import regroup_per_head, regroup_tensor
from gqa_convert.surgery.methods import Method
from gqa_convert.surgery.plan import HeadPlan, query_order_for


def _attention_from(
    get: Callable[[str], torch.Tensor | None], names: dict[str, str], num_heads: int, kv_heads: int, hd: int
) -> Attention:
    """q/k/v/o as float64 heads (biases as a last column) from a tensor getter (None: absent)."""

    def heads(role: str, count: int) -> tuple[torch.Tensor, bool]:
        weight = get(names[role] + ".weight")
        assert weight is not None
        weight = weight.double()
        bias = get(names[role] + ".bias")
        column = bias.double() if bias is not None else torch.zeros(len(weight), dtype=torch.float64)
        return torch.cat([weight, column[:, None]], dim=1).reshape(count, hd, -1), bias is not None

    q, q_bias = heads("q", num_heads)
    k, k_bias = heads("k", kv_heads)
    v, v_bias = heads("v", kv_heads)
    o = get(names["o"] + ".weight")
    assert o is not None
    return Attention(q, k, v, o.double().reshape(-1, num_heads, hd), q_bias, k_bias, v_bias)


def read_attention(checkpoint: Checkpoint, layer: int, plan: HeadPlan) -> tuple[Attention, dict[str, str]]:
    """One layer's q/k/v/o as float64 heads (biases as a last column) and the projections' names."""
    arch = checkpoint.architecture
    assert arch.projections is not None
    prefix = arch.layer_prefix.format(layer=layer)
    names = {role: prefix + suffix for role, suffix in arch.projections.items()}

    def get(name: str) -> torch.Tensor | None:
        return checkpoint.get(name) if name in checkpoint.tensors else None

    return _attention_from(get, names, plan.num_heads, plan.old_kv, plan.head_dim), names


def attention_tensors(
    merged: Attention, names: dict[str, str], dtypes: dict[str, torch.dtype]
) -> dict[str, torch.Tensor]:
    """The merged heads as the checkpoint's tensors (names and dtypes of the source)."""
    return merged.as_tensors(names, dtypes.__getitem__)


def _check_supported(checkpoint: Checkpoint, method: Method, grouping: Grouping) -> bool:
    """Refuse fused layouts; True when K is normalised after its projection (warned about)."""
    arch = checkpoint.architecture
    if method.needs_calibration and arch.projections is None:
        raise GQAConvertError(
            f"--method {method.name} needs separate q/k/v/o projections; {arch.model_type} fuses them: use --method mean"
        )
    if grouping.needs_calibration and arch.projections is None:
        raise GQAConvertError(
            f"--grouping {grouping.name} is not available for {arch.model_type} (fused projections): "
            "use --grouping contiguous"
        )
    prefix0 = arch.layer_prefix.format(layer=0)
    key_norm = any(name.startswith(prefix0 + norm) for name in checkpoint.tensors for norm in arch.key_norms)
    if key_norm and method.needs_calibration:
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


def output_layout(merged: Attention, groups: Groups) -> Attention:
    """The source-layout merged attention (kv heads repeated by group) -> one kv head per group."""
    return dataclasses.replace(merged, k=first_of_group(merged.k, groups), v=first_of_group(merged.v, groups))


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


@dataclass
class _Pass:
    """The calibrated pass's inputs and what it collects, layer by layer."""

    checkpoint: Checkpoint
    base: HeadPlan
    method: Method
    grouping: Grouping
    calibration: Calibration
    workdir: Path
    key_norm: bool
    log: Callable[[str], None]
    plans: dict[int, HeadPlan] = field(default_factory=dict)
    overrides: dict[str, Path] = field(default_factory=dict)
    last: float = field(default_factory=time.monotonic)  # when the previous layer was done

    def visit(self, layer: LayerCalibration) -> dict[str, torch.Tensor] | None:
        """Groups and (calibrated method) merged tensors of one layer; the state the next layers see."""
        attention, names = read_attention(self.checkpoint, layer.index, self.base)
        attention = attention.to(layer.device)
        plan = self.base
        if self.grouping.choose is not None:
            groups = self.grouping.choose(attention, layer, self.base.new_kv)
            plan = dataclasses.replace(self.base, groups=groups, query_order=query_order_for(groups, plan.readers()))
        self.plans[layer.index] = plan
        if self.method.merge_layer is None:
            return None
        if self.key_norm:
            layer.kv_norms = {
                k: v.to(layer.device) for k, v in source_kv_norms(self.checkpoint, layer.index, plan).items()
            }
        merged = self.method.merge_layer(attention, layer, plan.groups, plan.readers(), self.calibration)
        layer.attended = None  # the per-head moments (34 GB for a 70B shape): not needed by the refinement
        dtypes = {name: info.dtype for name, info in self.checkpoint.tensors.items()}
        tensors = attention_tensors(output_layout(merged.attention, plan.groups).to("cpu"), names, dtypes)
        source_layout = merged.attention
        if self.calibration.refine_steps:
            tensors, source_layout = self._refine(layer, plan, names, tensors, merged.report)
        path = self.workdir / f"layer-{layer.index:05d}.safetensors"
        save_file(tensors, path)
        self.overrides.update(dict.fromkeys(tensors, path))
        now = time.monotonic()  # the layer's whole work: its forwards, statistics, merge and refinement
        self.log(_summary(layer.index, now - self.last, merged.report))
        self.last = now
        return {**attention_state(source_layout, layer.projections), **layer.kv_norms}

    def _refine(self, layer, plan, names, tensors, report):
        arch = self.checkpoint.architecture
        prefix = arch.layer_prefix.format(layer=layer.index) + arch.attention_module + "."
        query_dims = {q.suffix.split(".", 1)[1]: q.dim for q in arch.query_tensors}
        calibration = self.calibration
        steps, lr, target = calibration.refine_steps, calibration.refine_lr, calibration.refine_target or "block"
        tensors, before, after = refine(layer, tensors, plan, prefix, query_dims, steps, lr, target)
        report["refine"] = (target, before, after)
        refined = _attention_from(tensors.get, names, plan.num_heads, plan.new_kv, plan.head_dim).to(layer.device)
        old_kv = plan.old_kv
        source_layout = dataclasses.replace(
            refined,
            k=repeat_by_group(refined.k, plan.groups, old_kv),
            v=repeat_by_group(refined.v, plan.groups, old_kv),
        )
        return tensors, source_layout


def calibrate_plans(
    checkpoint: Checkpoint, base: HeadPlan, method: Method, grouping: Grouping, calibration: Calibration, workdir: Path
) -> tuple[dict[int, HeadPlan], dict[str, Path]]:
    """Per-layer plans (groups, query order) and, for a calibrated method, files of merged tensors."""
    key_norm = _check_supported(checkpoint, method, grouping)
    if not method.needs_calibration:  # nothing is merged from calibration: both streams would be the same
        calibration = dataclasses.replace(calibration, sequential=False)
    ids = calibration_ids(checkpoint, calibration)
    with _progress() as progress:
        task = progress.add_task("calibrate", total=int(checkpoint.config.num_hidden_layers))
        work = _Pass(checkpoint, base, method, grouping, calibration, workdir, key_norm, progress.console.log)

        def visit(layer: LayerCalibration) -> dict[str, torch.Tensor] | None:
            state = work.visit(layer)
            progress.advance(task)
            return state

        run_layers(checkpoint, ids, calibration, key_norm, visit)
    return work.plans, work.overrides
