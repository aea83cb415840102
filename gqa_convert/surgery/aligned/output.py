"""The joint o_proj solve: with the merged q/k/v fixed, the attention output is linear in o_proj,
y = O f (f: the concatenated per-head outputs, o_proj's input). O minimises
||Y - F O^T||^2 + lam ||O - O_0||^2 (lam = ridge x the mean diagonal of F^T F; O_0 the closed-form
blocks), fitted on the first three quarters of the calibration batches for each candidate ridge and
checked on the last quarter: the best is kept only if it improves the check, then refitted on every
batch. How much to trust the fit varies by layer (some layers' fits overfit the calibration text).
This lets the query heads' o blocks compensate, jointly, what the merged K and V lose."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass
class OutputMoments:
    """F^T F and F^T Y over the fitting batches and over the check batches, and Y's energy there."""

    ff_fit: torch.Tensor
    fy_fit: torch.Tensor
    ff_check: torch.Tensor
    fy_check: torch.Tensor
    yy_check: float

    @classmethod
    def zeros(cls, features: int, outputs: int, device: str | torch.device) -> OutputMoments:
        def zero(*shape: int) -> torch.Tensor:
            return torch.zeros(*shape, dtype=torch.float64, device=device)

        return cls(
            zero(features, features), zero(features, outputs), zero(features, features), zero(features, outputs), 0.0
        )

    def add(self, features: torch.Tensor, targets: torch.Tensor, check: bool) -> None:
        f = features.reshape(-1, features.shape[-1]).double()
        y = targets.reshape(-1, targets.shape[-1]).double()
        if check:
            self.ff_check += f.T @ f
            self.fy_check += f.T @ y
            self.yy_check += float(y.pow(2).sum())
        else:
            self.ff_fit += f.T @ f
            self.fy_fit += f.T @ y


def _fit(ff: torch.Tensor, fy: torch.Tensor, o0: torch.Tensor, ridge: float) -> torch.Tensor:
    lam = ridge * ff.diagonal().mean().clamp_min(1e-300)
    eye = torch.eye(len(ff), dtype=ff.dtype, device=ff.device)
    return torch.linalg.solve(ff + lam * eye, fy + lam * o0.T).T


def _check_error(o: torch.Tensor, moments: OutputMoments) -> float:
    """||Y - F O^T||^2 / ||Y||^2 on the check batches, from the moments alone."""
    cross = float((o * moments.fy_check.T).sum())
    quadratic = float(torch.einsum("of,fg,og->", o, moments.ff_check, o))
    return (moments.yy_check - 2 * cross + quadratic) / max(moments.yy_check, 1e-300)


def solve_output(
    o0: torch.Tensor, moments: OutputMoments, ridges: Sequence[float]
) -> tuple[torch.Tensor, float, float, float]:
    """o0: (d_out, features). Returns the o_proj weight kept, the check error of the closed form and
    of the best solve (kept when lower), and that solve's ridge."""
    before = _check_error(o0, moments)
    after, ridge = min((_check_error(_fit(moments.ff_fit, moments.fy_fit, o0, r), moments), r) for r in ridges)
    if not after < before:
        return o0, before, after, ridge
    refit = _fit(moments.ff_fit + moments.ff_check, moments.fy_fit + moments.fy_check, o0, ridge)
    return refit, before, after, ridge
