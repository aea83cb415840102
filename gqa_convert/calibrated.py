"""Calibrated conversion: per layer, choose the groups (similarity grouping) and compute the merged
attention (aligned method) from calibration statistics, one layer in memory at a time. The merged
tensors go to one small safetensors file per layer; the streaming converter then reads them in place
of the source's attention tensors.
"""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from gqa_convert.aligned import Attention, cholesky, merge_keys, merge_values, rotary_pairs
from gqa_convert.calibrate import LayerStats, calibration_ids, layer_statistics
from gqa_convert.checkpoint import Checkpoint
from gqa_convert.errors import GQAConvertError
from gqa_convert.regroup import HeadPlan


@dataclass(frozen=True)
class Calibration:
    data: str
    tokens: int = 16384
    seq_len: int = 512
    text_column: str = "text"
    refine_steps: int = 0  # aligned only: Adam steps per layer fitting the merged attention to the original
    refine_lr: float = 3e-4


def rotary_dim(config, head_dim: int) -> int:
    rope = getattr(config, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
    return int(head_dim * factor) // 2 * 2


def readers_of(plan: HeadPlan) -> dict[int, list[int]]:
    """Source kv head -> the source query heads that read it."""
    per = plan.num_heads // plan.old_kv
    return {k: list(range(k * per, (k + 1) * per)) for k in range(plan.old_kv)}


def read_attention(checkpoint: Checkpoint, layer: int, plan: HeadPlan) -> tuple[Attention, dict[str, str]]:
    arch = checkpoint.architecture
    prefix = arch.layer_prefix.format(layer=layer)
    names = {role: prefix + suffix for role, suffix in (arch.projections or {}).items()}
    nh, nkv, hd = plan.num_heads, plan.old_kv, plan.head_dim

    def heads(role: str, count: int) -> tuple[torch.Tensor, bool]:
        weight = checkpoint.get(names[role] + ".weight").double()
        bias_name = names[role] + ".bias"
        has_bias = bias_name in checkpoint.tensors
        bias = checkpoint.get(bias_name).double() if has_bias else torch.zeros(len(weight), dtype=torch.float64)
        return torch.cat([weight, bias[:, None]], dim=1).reshape(count, hd, -1), has_bias

    q, q_bias = heads("q", nh)
    k, k_bias = heads("k", nkv)
    v, v_bias = heads("v", nkv)
    o = checkpoint.get(names["o"] + ".weight").double().reshape(-1, nh, hd)
    return Attention(q, k, v, o, q_bias, k_bias, v_bias), names


# ---- similarity grouping ---------------------------------------------------------------------------


def head_similarity(attention: Attention, moment: torch.Tensor, rotary: int) -> torch.Tensor:
    """(nkv, nkv) in [0, 1]: how well two kv heads share one head, after alignment. V: mean squared
    cosine of the principal angles between their whitened value subspaces. K: per frequency, the
    squared correlation of their complex keys (a complex scale aligns them), averaged."""
    nkv, hd, width = attention.v.shape
    lower = cholesky(moment)
    bases = [torch.linalg.qr((attention.v[k] @ lower).T).Q for k in range(nkv)]  # (width, hd)
    value = torch.stack([torch.stack([(bases[a].T @ bases[b]).pow(2).sum() / hd for b in range(nkv)])
                         for a in range(nkv)])  # fmt: skip
    key = torch.zeros(nkv, nkv, dtype=torch.float64)
    pairs = rotary_pairs(hd, rotary)
    s = moment.to(torch.complex128)
    for i, j in pairs:
        keys = torch.complex(attention.k[:, i], attention.k[:, j])  # (nkv, width)
        cross = keys.conj() @ s @ keys.T
        energy = cross.diagonal().real.clamp_min(1e-300)
        key += cross.abs().pow(2) / (energy[:, None] * energy[None, :])
    return (value + key / len(pairs)) / 2


def similar_groups(similarity: torch.Tensor, kv_heads: int) -> tuple[tuple[int, ...], ...]:
    """Equal-size groups, greedy: the lowest free head takes the free heads most similar to it."""
    size = len(similarity) // kv_heads
    free = list(range(len(similarity)))
    groups = []
    while free:
        seed = free.pop(0)
        ranked = sorted(free, key=lambda other: (-float(similarity[seed, other]), other))
        members = sorted([seed, *ranked[: size - 1]])
        free = [head for head in free if head not in members]
        groups.append(tuple(members))
    return tuple(groups)


# ---- the per-layer pass ----------------------------------------------------------------------------


def _aligned_tensors(attention: Attention, stats: LayerStats, plan: HeadPlan, names: dict[str, str],
                     rotary: int, key_norm: bool, dtypes: dict[str, torch.dtype]) -> dict[str, torch.Tensor]:  # fmt: skip
    readers = readers_of(plan)
    new_v, new_o = merge_values(attention, stats.second_moment, plan.groups, readers)
    if key_norm:  # K by mean pooling, queries unchanged (see the docs)
        new_k = torch.stack([attention.k[list(group)].mean(0) for group in plan.groups])
        new_q = attention.q
    else:
        new_k, new_q = merge_keys(attention, stats.second_moment, plan.groups, readers, rotary)
    out = {}
    for role, heads, has_bias in (("q", new_q, attention.q_bias), ("k", new_k, attention.k_bias),
                                  ("v", new_v, attention.v_bias)):  # fmt: skip
        flat = heads.reshape(-1, heads.shape[-1])
        out[names[role] + ".weight"] = flat[:, :-1].to(dtypes[names[role] + ".weight"]).contiguous()
        if has_bias:
            out[names[role] + ".bias"] = flat[:, -1].to(dtypes[names[role] + ".bias"]).contiguous()
    out[names["o"] + ".weight"] = new_o.reshape(new_o.shape[0], -1).to(dtypes[names["o"] + ".weight"]).contiguous()
    return out


def refine(stats: LayerStats, tensors: dict[str, torch.Tensor], plan: HeadPlan, attention_prefix: str,
           query_dims: dict[str, int], calibration: Calibration) -> tuple[dict[str, torch.Tensor], float, float]:  # fmt: skip
    """Fit the merged attention module's q/k/v/o to the original module's outputs on the calibration
    inputs (relative squared error), Adam, full batch. The last quarter of the calibration batches is
    held out: the step kept is the best there, so refinement never makes the held-out fit worse.
    Returns the tensors and the held-out error before and after."""
    from gqa_convert.regroup import permute_query_tensor

    calls = stats.attention_calls or []
    held = max(1, len(calls) // 4)
    train, check = calls[:-held], calls[-held:]
    module = stats.make_attention(plan.new_kv)
    inverse = None
    if plan.query_order is not None:
        inverse = [0] * plan.num_heads
        for position, head in enumerate(plan.query_order):
            inverse[head] = position
    local = {}
    for name, tensor in tensors.items():
        key = name[len(attention_prefix) :]
        dim = query_dims.get(key)
        local[key] = permute_query_tensor(tensor.float(), dim, plan) if dim is not None else tensor.float()
    missing, unexpected = module.load_state_dict(local, strict=False)
    if missing or unexpected or not train:
        reason = f"parameters not covered: {missing or unexpected}" if missing or unexpected else "too few batches"
        warnings.warn(f"refinement skipped for {attention_prefix}: {reason}", stacklevel=2)
        return tensors, float("nan"), float("nan")

    def error(batches) -> torch.Tensor:
        total, norm = 0.0, 0.0
        for hidden, kwargs, target in batches:
            output = module(hidden_states=hidden, **kwargs)
            output = output[0] if isinstance(output, tuple) else output
            total = total + (output - target).pow(2).sum()
            norm += float(target.pow(2).sum())
        return total / norm

    parameters = [parameter for parameter in module.parameters()]
    optimizer = torch.optim.Adam(parameters, lr=calibration.refine_lr)
    with torch.no_grad():
        before = best = float(error(check))
    best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    for step in range(calibration.refine_steps):
        optimizer.zero_grad(set_to_none=True)
        error(train).backward()
        optimizer.step()
        if step % 5 == 4 or step == calibration.refine_steps - 1:
            with torch.no_grad():
                now = float(error(check))
            if now < best:
                best, best_state = now, {k: v.detach().clone() for k, v in module.state_dict().items()}
    refined = {}
    for name, tensor in tensors.items():
        key = name[len(attention_prefix) :]
        value = best_state[key]
        dim = query_dims.get(key)
        if dim is not None and inverse is not None:  # back to source query order, as overrides are kept
            value = permute_query_tensor(value, dim, dataclasses.replace(plan, query_order=tuple(inverse)))
        refined[name] = value.to(tensor.dtype).contiguous()
    return refined, before, best


def calibrate_plans(checkpoint: Checkpoint, base: HeadPlan, method: str, grouping: str, calibration: Calibration,
                    workdir: Path) -> tuple[dict[int, HeadPlan], dict[str, Path]]:  # fmt: skip
    """Per-layer plans (groups, query order) and, for the aligned method, files of merged tensors."""
    if method == "aligned" and checkpoint.architecture.projections is None:
        raise GQAConvertError(f"--method aligned needs separate q/k/v/o projections; {checkpoint.architecture.model_type} "
                              "fuses them: use --method mean")  # fmt: skip
    if grouping == "similarity" and checkpoint.architecture.projections is None:
        raise GQAConvertError(f"--grouping similarity is not available for {checkpoint.architecture.model_type} "
                              "(fused projections): use --grouping contiguous")  # fmt: skip
    rotary = rotary_dim(checkpoint.config, base.head_dim)
    prefix0 = checkpoint.architecture.layer_prefix.format(layer=0)
    key_norm = any(name.startswith(prefix0 + norm) for name in checkpoint.tensors
                   for norm in checkpoint.architecture.key_norms)  # fmt: skip
    if key_norm and method == "aligned":
        warnings.warn("this model normalises K after the projection, which a closed-form K merge cannot pass "
                      "through: V is merged by the calibrated method, K by mean pooling", stacklevel=2)  # fmt: skip
    ids = calibration_ids(checkpoint, calibration.data, calibration.tokens, calibration.seq_len,
                          calibration.text_column)  # fmt: skip
    plans: dict[int, HeadPlan] = {}
    overrides: dict[str, Path] = {}
    layers = int(checkpoint.config.num_hidden_layers)
    with Progress(TextColumn("calibrating"), BarColumn(), MofNCompleteColumn(), TextColumn("layers"),
                  TimeRemainingColumn()) as progress:  # fmt: skip
        task = progress.add_task("calibrate", total=layers)
        refining = method == "aligned" and calibration.refine_steps > 0
        attention_name = checkpoint.architecture.kv_tensors[0].suffix.split(".")[0]
        # q rows and o columns, relative to the attention module: the tensors a query permutation moves
        query_dims = {q.suffix.split(".", 1)[1]: q.dim for q in checkpoint.architecture.query_tensors}
        for layer, stats in layer_statistics(checkpoint, ids, keep_activations=refining):
            attention, names = read_attention(checkpoint, layer, base)
            plan = base
            if grouping == "similarity":
                groups = similar_groups(head_similarity(attention, stats.second_moment, rotary), base.new_kv)
                order = tuple(q for group in groups for k in group for q in readers_of(base)[k])
                plan = dataclasses.replace(base, groups=groups, query_order=order)
            plans[layer] = plan
            if method == "aligned":
                dtypes = {name: info.dtype for name, info in checkpoint.tensors.items()}
                tensors = _aligned_tensors(attention, stats, plan, names, rotary, key_norm, dtypes)
                if refining:
                    prefix = checkpoint.architecture.layer_prefix.format(layer=layer) + attention_name + "."
                    with torch.enable_grad():
                        tensors, before, after = refine(stats, tensors, plan, prefix, query_dims, calibration)
                    progress.console.log(f"layer {layer}: held-out attention error {before:.4f} -> {after:.4f}")
                from safetensors.torch import save_file

                path = workdir / f"layer-{layer:05d}.safetensors"
                save_file(tensors, path)
                overrides.update(dict.fromkeys(tensors, path))
            progress.advance(task)
    return plans, overrides
