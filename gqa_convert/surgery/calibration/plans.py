"""The calibrated pass: per layer, choose the groups (a calibrated grouping) and compute the merged
attention (a calibrated method, optionally refined), one layer in memory at a time. The merged tensors
go to one small safetensors file per layer; the streaming converter then reads them in place of the
source's attention tensors."""

from __future__ import annotations

import dataclasses
import warnings
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import save_file

from gqa_convert.arch import rotary_dim
from gqa_convert.errors import GQAConvertError
from gqa_convert.io.sources import Checkpoint
from gqa_convert.surgery.calibration.activations import calibration_ids, layer_statistics
from gqa_convert.surgery.calibration.aligned import Attention
from gqa_convert.surgery.calibration.refine import refine
from gqa_convert.surgery.groupings import Grouping
from gqa_convert.surgery.methods import Method
from gqa_convert.surgery.options import Calibration
from gqa_convert.surgery.plan import HeadPlan, query_order_for


def read_attention(checkpoint: Checkpoint, layer: int, plan: HeadPlan) -> tuple[Attention, dict[str, str]]:
    """One layer's q/k/v/o as float64 heads (biases as a last column) and the projections' names."""
    arch = checkpoint.architecture
    assert arch.projections is not None
    prefix = arch.layer_prefix.format(layer=layer)
    names = {role: prefix + suffix for role, suffix in arch.projections.items()}
    hd = plan.head_dim

    def heads(role: str, count: int) -> tuple[torch.Tensor, bool]:
        weight = checkpoint.get(names[role] + ".weight").double()
        bias_name = names[role] + ".bias"
        has_bias = bias_name in checkpoint.tensors
        bias = checkpoint.get(bias_name).double() if has_bias else torch.zeros(len(weight), dtype=torch.float64)
        return torch.cat([weight, bias[:, None]], dim=1).reshape(count, hd, -1), has_bias

    q, q_bias = heads("q", plan.num_heads)
    k, k_bias = heads("k", plan.old_kv)
    v, v_bias = heads("v", plan.old_kv)
    o = checkpoint.get(names["o"] + ".weight").double().reshape(-1, plan.num_heads, hd)
    return Attention(q, k, v, o, q_bias, k_bias, v_bias), names


def attention_tensors(
    merged: Attention, names: dict[str, str], dtypes: dict[str, torch.dtype]
) -> dict[str, torch.Tensor]:
    """The merged heads as the checkpoint's tensors (names and dtypes of the source)."""
    out = {}
    for role, heads, has_bias in (
        ("q", merged.q, merged.q_bias),
        ("k", merged.k, merged.k_bias),
        ("v", merged.v, merged.v_bias),
    ):
        flat = heads.reshape(-1, heads.shape[-1])
        out[names[role] + ".weight"] = flat[:, :-1].to(dtypes[names[role] + ".weight"]).contiguous()
        if has_bias:
            out[names[role] + ".bias"] = flat[:, -1].to(dtypes[names[role] + ".bias"]).contiguous()
    o_name = names["o"] + ".weight"
    out[o_name] = merged.o.reshape(merged.o.shape[0], -1).to(dtypes[o_name]).contiguous()
    return out


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


def calibrate_plans(
    checkpoint: Checkpoint, base: HeadPlan, method: Method, grouping: Grouping, calibration: Calibration, workdir: Path
) -> tuple[dict[int, HeadPlan], dict[str, Path]]:
    """Per-layer plans (groups, query order) and, for a calibrated method, files of merged tensors."""
    key_norm = _check_supported(checkpoint, method, grouping)
    arch = checkpoint.architecture
    rotary = rotary_dim(checkpoint.config, base.head_dim)
    ids = calibration_ids(
        checkpoint, calibration.data, calibration.tokens, calibration.seq_len, calibration.text_column
    )
    refining = method.needs_calibration and calibration.refine_steps > 0
    # q rows and o columns, relative to the attention module: the tensors a query permutation moves
    query_dims = {q.suffix.split(".", 1)[1]: q.dim for q in arch.query_tensors}
    dtypes = {name: info.dtype for name, info in checkpoint.tensors.items()}
    plans: dict[int, HeadPlan] = {}
    overrides: dict[str, Path] = {}
    with _progress() as progress:
        task = progress.add_task("calibrate", total=int(checkpoint.config.num_hidden_layers))
        for layer, stats in layer_statistics(checkpoint, ids, keep_activations=refining):
            attention, names = read_attention(checkpoint, layer, base)
            plan = base
            if grouping.choose is not None:
                groups = grouping.choose(attention, stats.second_moment, rotary, base.new_kv)
                plan = dataclasses.replace(base, groups=groups, query_order=query_order_for(groups, base.readers()))
            plans[layer] = plan
            if method.merge_layer is not None:
                merged = method.merge_layer(
                    attention, stats.second_moment, plan.groups, plan.readers(), rotary, key_norm
                )
                tensors = attention_tensors(merged, names, dtypes)
                if refining:
                    prefix = arch.layer_prefix.format(layer=layer) + arch.attention_module + "."
                    tensors, before, after = refine(
                        stats, tensors, plan, prefix, query_dims, calibration.refine_steps, calibration.refine_lr
                    )
                    progress.console.log(f"layer {layer}: held-out attention error {before:.4f} -> {after:.4f}")
                path = workdir / f"layer-{layer:05d}.safetensors"
                save_file(tensors, path)
                overrides.update(dict.fromkeys(tensors, path))
            progress.advance(task)
    return plans, overrides
