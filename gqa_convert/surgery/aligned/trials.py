"""Merged weights tried on the layer's own attention module, in the source's layout (merged kv heads
repeated to every member of their group: the same function as the merged layer), over the calibration
calls: the relative attention error against the source's outputs, and the moments of the o_proj
solve. Running the architecture's own module covers masks, sliding windows, soft-capping, scaling
and norms without re-implementing attention."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from gqa_convert.surgery.aligned.attention import Attention, LayerInputs
from gqa_convert.surgery.aligned.output import OutputMoments


def attention_state(attention: Attention, projections: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """q/k/v/o weights (and the biases the source has) as the attention module's state, float32.
    projections: role -> the projection's name inside the attention module."""
    return attention.as_tensors(projections, lambda name: torch.float32)


@contextlib.contextmanager
def substituted(module: Any, state: dict[str, torch.Tensor]) -> Iterator[Any]:
    """The module with some of its parameters replaced, restored on exit."""
    own = dict(module.named_parameters())
    saved = {name: own[name].detach().clone() for name in state}
    with torch.no_grad():
        for name, value in state.items():
            own[name].copy_(value)
    try:
        yield module
    finally:
        with torch.no_grad():
            for name, value in saved.items():
                own[name].copy_(value)


def attention_error(inputs: LayerInputs, state: dict[str, torch.Tensor], batches: int) -> float:
    """sum ||A'(x) - target||^2 / sum ||target||^2 over the first `batches` calibration batches."""
    total, norm = 0.0, 0.0
    statistics = inputs.statistics
    with substituted(statistics.module, {**state, **inputs.kv_norms}) as module, torch.no_grad():
        for hidden, kwargs, target in statistics.calls[:batches]:
            output = module(hidden_states=hidden, **kwargs)[0]
            total += float((output - target).double().pow(2).sum())
            norm += float(target.double().pow(2).sum())
    return total / max(norm, 1e-300)


def check_batches(calls: Sequence[Any]) -> int:
    """How many of the last calibration batches are held out for checks (a quarter, at least one)."""
    return max(1, len(calls) // 4)


def output_moments(inputs: LayerInputs, state: dict[str, torch.Tensor], o_name: str) -> OutputMoments:
    """The o_proj solve's moments: o_proj's inputs under `state` against the source's attention
    outputs (less o_proj's bias, which the solve leaves alone)."""
    statistics = inputs.statistics
    o_module = statistics.module.get_submodule(o_name)
    features: list[torch.Tensor] = []
    handle = o_module.register_forward_pre_hook(lambda module, args: features.append(args[0].detach()))
    held = check_batches(statistics.calls)
    moments = None
    try:
        with substituted(statistics.module, {**state, **inputs.kv_norms}) as module, torch.no_grad():
            for position, (hidden, kwargs, target) in enumerate(statistics.calls):
                module(hidden_states=hidden, **kwargs)
                f = features.pop()
                y = target - o_module.bias if o_module.bias is not None else target
                if moments is None:
                    moments = OutputMoments.zeros(f.shape[-1], y.shape[-1], f.device)
                moments.add(f, y, check=position >= len(statistics.calls) - held)
    finally:
        handle.remove()
    assert moments is not None
    return moments
