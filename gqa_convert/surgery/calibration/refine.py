"""Refinement: fit one layer's merged q/k/v/o to the original attention module's outputs on the
calibration inputs (the student's inputs with sequential calibration) (relative squared error, Adam, full batch). The last quarter of the calibration
batches is held out and the step kept is the best there, so refinement never makes that fit worse."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch

from gqa_convert.surgery.calibration.sequential import AttentionCall, LayerCalibration
from gqa_convert.surgery.layouts import permute_query_tensor
from gqa_convert.surgery.plan import HeadPlan


def _relative_error(module: Any, batches: Sequence[AttentionCall]) -> torch.Tensor:
    total, norm = 0.0, 0.0
    for hidden, kwargs, target in batches:
        output = module(hidden_states=hidden, **kwargs)
        output = output[0] if isinstance(output, tuple) else output
        total = total + (output - target).pow(2).sum()
        norm += float(target.pow(2).sum())
    return total / norm


def _fit(module: Any, train: Sequence[AttentionCall], check: Sequence[AttentionCall], steps: int, lr: float):
    """Adam on every parameter of the module; returns the held-out error before, the best, and the
    state at the best held-out step (checked every 5 steps and at the last)."""
    optimizer = torch.optim.Adam(list(module.parameters()), lr=lr)
    with torch.no_grad():
        before = best = float(_relative_error(module, check))
    best_state = {k: v.detach().clone() for k, v in module.state_dict().items()}
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        _relative_error(module, train).backward()
        optimizer.step()
        if step % 5 == 4 or step == steps - 1:
            with torch.no_grad():
                now = float(_relative_error(module, check))
            if now < best:
                best, best_state = now, {k: v.detach().clone() for k, v in module.state_dict().items()}
    return before, best, best_state


def refine(
    stats: LayerCalibration,
    tensors: dict[str, torch.Tensor],
    plan: HeadPlan,
    attention_prefix: str,
    query_dims: dict[str, int],
    steps: int,
    lr: float,
) -> tuple[dict[str, torch.Tensor], float, float]:
    """Refine the merged tensors of one layer (names under attention_prefix, query heads in source
    order). Returns the tensors and the held-out error before and after."""
    calls = stats.calls
    held = max(1, len(calls) // 4)
    train, check = calls[:-held], calls[-held:]
    module = stats.make_attention(plan.new_kv)
    local = {}
    for name, tensor in tensors.items():  # into the plan's query order: the order the module computes in
        key = name[len(attention_prefix) :]
        dim = query_dims.get(key)
        local[key] = (
            tensor.float()
            if dim is None
            else permute_query_tensor(tensor.float(), dim, plan.num_heads, plan.query_order)
        )
    missing, unexpected = module.load_state_dict(local, strict=False)
    if missing or unexpected or not train:
        reason = f"parameters not covered: {missing or unexpected}" if missing or unexpected else "too few batches"
        warnings.warn(f"refinement skipped for {attention_prefix}: {reason}", stacklevel=2)
        return tensors, float("nan"), float("nan")
    with torch.enable_grad():
        before, best, best_state = _fit(module, train, check, steps, lr)
    inverse = plan.inverse_query_order()
    refined = {}
    for name, tensor in tensors.items():  # back to source query order, as the merged tensors are kept
        key = name[len(attention_prefix) :]
        value, dim = best_state[key], query_dims.get(key)
        if dim is not None:
            value = permute_query_tensor(value, dim, plan.num_heads, inverse)
        refined[name] = value.to("cpu", tensor.dtype).contiguous()
    return refined, before, best
