"""One layer's calibration statistics, immutable once collected.

Moments are float64 over [x, 1] (x: the attention's input; the constant 1 carries the biases). The
attended moments are those of z_h,m = sum_n a_h(m, n) x_n, what query head h's values are averaged
over, from the layer's own attention probabilities: per query head, or averaged over the heads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

# One call of an attention module (or decoder layer): its hidden-states input, its other keyword
# arguments, its target output.
AttentionCall = tuple[torch.Tensor, dict[str, Any], torch.Tensor]
# which attended moments a calibration collects: none, the heads' average, or one per query head
ATTENDED_MOMENTS = ("none", "averaged", "per-head")


@dataclass(frozen=True)
class LayerStatistics:
    """What a calibrated method may use to merge one layer."""

    index: int
    module: Any  # the layer's attention module with the source weights (eager, on the device)
    projections: Mapping[str, str]  # role (q, k, v, o) -> the projection's name inside `module`
    attention_name: str  # the attention module's name inside the decoder layer
    calls: tuple[AttentionCall, ...]  # per batch: student attention input, kwargs, teacher attention output
    blocks: tuple[AttentionCall, ...]  # per batch: student layer input, kwargs, teacher layer output
    moment: torch.Tensor  # sum of [x, 1][x, 1]^T
    mean: torch.Tensor  # mean of [x, 1]
    tokens: int
    attended: torch.Tensor | None  # the head-averaged attended moment (d + 1, d + 1); None: not collected
    # per query head (nh, d + 1, d + 1), shrunk toward their average (shrink_moments_); None: not collected
    attended_per_head: torch.Tensor | None
    make_layer: Callable[[int], Any]  # kv heads -> this decoder layer (eager, device), attention freshly built

    @property
    def device(self) -> torch.device:
        return self.moment.device

    def without_attended(self) -> LayerStatistics:
        """The same statistics without the attended moments (tens of GB for a 70B shape), once merged."""
        return dataclasses.replace(self, attended=None, attended_per_head=None)


def moments(
    attention: Any, calls: tuple[AttentionCall, ...], attended: str
) -> tuple[torch.Tensor, torch.Tensor, int, torch.Tensor | None, torch.Tensor | None]:
    """The moment and mean of [x, 1], the token count, and the attended moments asked for (a key of
    ATTENDED_MOMENTS): (moment, mean, tokens, head-averaged, per head)."""
    width = calls[0][0].shape[-1] + 1
    device = calls[0][0].device
    moment = torch.zeros(width, width, dtype=torch.float64, device=device)
    total = torch.zeros(width, dtype=torch.float64, device=device)
    over = None
    count = 0
    for hidden, kwargs, _ in calls:
        x = torch.cat([hidden, torch.ones(*hidden.shape[:-1], 1, device=device)], dim=-1)  # (B, T, d + 1)
        flat = x.reshape(-1, width).double()
        moment += flat.T @ flat
        total += flat.sum(0)
        count += len(flat)
        if attended != "none":
            with torch.no_grad():
                probs = attention(hidden_states=hidden, **kwargs)[1]  # (B, nh, T, T)
            heads = probs.shape[1]
            if over is None:  # one (d + 1)^2 moment per head, or their average: summed in place
                shape = (heads, width, width) if attended == "per-head" else (width, width)
                over = torch.zeros(shape, dtype=torch.float64, device=device)
            for head in range(heads):  # one at a time: all heads' at once are GBs for a 70B shape
                # moments summed in float64 (float32 sums of the residual stream's large activations are not PSD)
                rows = (probs[:, head] @ x).reshape(-1, width).double()
                if attended == "per-head":
                    over[head].addmm_(rows.T, rows)
                else:
                    over.addmm_(rows.T, rows, alpha=1 / heads)
    if attended != "per-head":
        return moment, total / count, count, over, None
    assert over is not None
    average = over.mean(0)  # shrinking toward the average leaves the average as it is
    return moment, total / count, count, average, shrink_moments_(over, count)


def shrink_moments_(per_head: torch.Tensor, tokens: int) -> torch.Tensor:
    """Each query head's attended moment (nh, w, w) shrunk in place toward the heads' average by
    w / (w + tokens): a head's moment from few tokens is rank-deficient, and a fit to it would follow
    directions the calibration text never excited (a few hundred tokens gave perplexities in the
    thousands). In place: for a 70B shape each copy is tens of GB."""
    width = per_head.shape[-1]
    weight = width / (width + tokens)
    average = per_head.mean(0)
    return per_head.mul_(1 - weight).add_(average, alpha=weight)
