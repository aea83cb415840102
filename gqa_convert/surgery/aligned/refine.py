"""Refinement: fit one layer's merged q/k/v/o by Adam (full batch, the gradient accumulated one batch at
a time) on the calibration inputs (the student's inputs with sequential calibration), to one of two
targets:

- attention: the original attention module's outputs (relative squared error);
- block: the original decoder layer's outputs (the residual stream after the layer, MLP included),
  per-token relative squared error. The MLP's response to the attention's error counts, and with
  sequential calibration the attention also corrects the drift the merged layers before it left in
  the residual stream. Only the attention's weights change.

The last quarter of the calibration batches is held out and the step kept is the best there, so
refinement never makes that fit worse."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from gqa_convert.calibration import AttentionCall, LayerStatistics
from gqa_convert.surgery.aligned.attention import Attention, attention_from
from gqa_convert.surgery.aligned.settings import REFINE_TARGETS, RefineSettings
from gqa_convert.surgery.layouts import permute_query_tensor
from gqa_convert.surgery.plan import HeadPlan


@dataclass(frozen=True)
class Target:
    """An error summed over batches and divided by a normaliser that depends on the targets only, so its
    gradient can be accumulated one batch at a time (one batch's activations in memory)."""

    error: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (output, target) -> the batch's summed error
    weight: Callable[[torch.Tensor], float]  # target -> the batch's share of the normaliser


def _squared(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    return (output - target).pow(2).sum()


def _per_token(output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    # each token's squared error relative to its target's squared norm: what the next layer's input norm
    # sees (a token with massive activations does not outweigh the others)
    norms = target.pow(2).sum(-1).clamp_min(torch.finfo(target.dtype).tiny)
    return ((output - target).pow(2).sum(-1) / norms).sum()


TARGETS: dict[str, Target] = {
    # the attention's output: squared error relative to the targets' squared norm
    "attention": Target(_squared, lambda target: float(target.pow(2).sum())),
    # the decoder layer's output: the mean over tokens of the per-token relative error
    "block": Target(_per_token, lambda target: float(target[..., 0].numel())),
}
assert tuple(TARGETS) == REFINE_TARGETS


def measure(module: Any, batches: Sequence[AttentionCall], target: Target, backward: bool = False) -> float:
    """The error of `module` over the batches; with `backward`, its gradient accumulated batch by batch."""
    normaliser = sum(target.weight(expected) for _, _, expected in batches)
    total = 0.0
    for hidden, kwargs, expected in batches:
        output = module(hidden, **kwargs)
        term = target.error(output[0] if isinstance(output, tuple) else output, expected) / normaliser
        if backward:
            term.backward()
        total += float(term)
    return total


def _fit(module: Any, attention: Any, trained: set[str], target: Target, train, check, steps: int, lr: float):
    """Adam on the attention's parameters named in `trained`; returns the held-out error before, the
    best, and the attention's state at the best held-out step (checked every 5 steps and at the last)."""
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    parameters = [parameter for name, parameter in attention.named_parameters() if name in trained]
    for parameter in parameters:
        parameter.requires_grad_(True)
    optimizer = torch.optim.Adam(parameters, lr=lr)
    with torch.no_grad():
        before = best = measure(module, check, target)
    best_state = {k: v.detach().clone() for k, v in attention.state_dict().items()}
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        measure(module, train, target, backward=True)
        optimizer.step()
        if step % 5 == 4 or step == steps - 1:
            with torch.no_grad():
                now = measure(module, check, target)
            if now < best:
                best, best_state = now, {k: v.detach().clone() for k, v in attention.state_dict().items()}
    return before, best, best_state


def refine(
    stats: LayerStatistics,
    tensors: dict[str, torch.Tensor],
    plan: HeadPlan,
    attention_prefix: str,
    query_dims: dict[str, int],
    steps: int,
    lr: float,
    target: str = "block",
) -> tuple[dict[str, torch.Tensor], float, float]:
    """Refine the merged tensors of one layer (names under attention_prefix, query heads in source
    order) toward `target` (a key of TARGETS). Returns the tensors and the held-out error before and after."""
    batches = stats.calls if target == "attention" else stats.blocks
    held = max(1, len(batches) // 4)
    train, check = batches[:-held], batches[-held:]
    layer = stats.make_layer(plan.new_kv)
    attention = getattr(layer, stats.attention_name)
    local = {}
    for name, tensor in tensors.items():  # into the plan's query order: the order the module computes in
        key = name[len(attention_prefix) :]
        dim = query_dims.get(key)
        local[key] = (
            tensor.float()
            if dim is None
            else permute_query_tensor(tensor.float(), dim, plan.num_heads, plan.query_order)
        )
    # what the merge does not write and does not depend on the kv count (an o_proj bias, a k norm shared by
    # the heads) stays the source's, frozen; a kv-dependent one (a k norm per kv head) is not covered
    source = stats.module.state_dict()
    kept = {
        k: source[k]
        for k, v in attention.state_dict().items()
        if k not in local and k in source and source[k].shape == v.shape
    }
    missing, unexpected = attention.load_state_dict({**kept, **local}, strict=False)
    if missing or unexpected or not train:
        reason = f"parameters not covered: {missing or unexpected}" if missing or unexpected else "too few batches"
        warnings.warn(f"refinement skipped for {attention_prefix}: {reason}", stacklevel=2)
        return tensors, float("nan"), float("nan")
    module = attention if target == "attention" else layer
    with torch.enable_grad():
        before, best, best_state = _fit(module, attention, set(local), TARGETS[target], train, check, steps, lr)
    inverse = plan.inverse_query_order()
    refined = {}
    for name, tensor in tensors.items():  # back to source query order, as the merged tensors are kept
        key = name[len(attention_prefix) :]
        value, dim = best_state[key], query_dims.get(key)
        if dim is not None:
            value = permute_query_tensor(value, dim, plan.num_heads, inverse)
        refined[name] = value.to("cpu", tensor.dtype).contiguous()
    return refined, before, best


def refine_layer(
    stats: LayerStatistics,
    tensors: dict[str, torch.Tensor],
    plan: HeadPlan,
    names: dict[str, str],
    attention_prefix: str,
    query_dims: dict[str, int],
    settings: RefineSettings,
) -> tuple[dict[str, torch.Tensor], Attention, tuple[str, float, float]]:
    """The merged tensors of one layer (names: role -> the checkpoint's projection names) refined, the
    refined attention in the source's layout (what the next layers' student stream runs through), and
    (target, held-out error before, after) for the log."""
    tensors, before, after = refine(
        stats, tensors, plan, attention_prefix, query_dims, settings.steps, settings.lr, settings.target
    )
    refined = attention_from(tensors.get, names, plan.num_heads, plan.new_kv, plan.head_dim).to(stats.device)
    return tensors, refined.repeated(plan.groups, plan.old_kv), (settings.target, before, after)
