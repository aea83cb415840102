"""The V merge: a shared V projection per group, each query head's o_proj block absorbing its map.

Query head h outputs W_o,h sum_n a_h(m, n) W_v,k(h) x_n. A shared W_v and new o blocks C_h minimise
sum_h ||(W_o,h W_v,k(h) - C_h W_v) Z||^2 over the calibration data Z, whose second moment is either the
plain moment of the inputs x or the attended moment (the moment of z_h,m = sum_n a_h(m, n) x_n, what
the values are actually averaged over, which is smoother and lower-rank than x). With E_k = W_v,k L
(L L^T = the moment), the shared head spans the top-hd right singular vectors P of the stacked
C_k E_k (C_k^T C_k = sum_{h reads k} W_o,h^T W_o,h): W_v = P^T L^-1 and C_h = W_o,h E_k(h) P.
Exact when the merged heads are copies.

Each query head averages its values over its own attention, so the heads' attended moments M_h differ
(local heads, global heads). With them (`per_head`), the closed form above, from the heads' average, is
the start of an alternating solve of sum_h ||(A_h - C_h W_v) L_h||^2 (A_h = W_o,h W_v,k(h), L_h L_h^T =
M_h): the o blocks C_h in closed form given W_v, then W_v given the C_h, whose normal equations
sum_h C_h^T C_h W_v M_h = sum_h C_h^T A_h M_h are solved by preconditioned conjugate gradients from the
current W_v. Each half-step lowers the objective, so the result is never worse than the start. The
M_h are accumulated in float64 (float32 sums of the residual stream's large activations are not
positive semi-definite) and shrunk toward their average where calibration tokens are few
(gqa_convert.calibration.statistics.shrink_moments_).
"""

from __future__ import annotations

import torch

from gqa_convert.surgery.aligned.attention import Attention
from gqa_convert.surgery.aligned.linalg import (
    RIDGE,
    Groups,
    Readers,
    cholesky,
    psd_root,
    restrict,
    top_row_space,
)

VALUE_ROUNDS = 4  # alternations of the o blocks and the shared V (8 measured no better on SmolLM2)
CG_STEPS = 20  # conjugate-gradient steps per V solve, at most (preconditioned: 15 did as well as 60)
CG_TOLERANCE = 1e-6  # relative residual at which a V solve stops


def merge_values(
    attention: Attention,
    moment: torch.Tensor,
    groups: Groups,
    readers: Readers,
    per_head: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """New V heads (G, hd, d) and new o_proj blocks (d_out, nh, hd). per_head: (nh, d, d) attended
    moments, one per query head, for the alternating refinement."""
    hd = attention.v.shape[1]
    lower = cholesky(restrict(moment, attention.v_bias))
    width = len(lower)
    new_v = torch.zeros(len(groups), *attention.v.shape[1:], dtype=torch.float64, device=attention.v.device)
    new_o = attention.o.clone()
    for g, group in enumerate(groups):
        projections = {k: attention.v[k, :, :width] @ lower for k in group}  # E_k: (hd, width)
        blocks = []
        for k in group:
            reads = attention.o[:, readers[k], :]  # (d_out, n_read, hd)
            blocks.append(psd_root(torch.einsum("oni,onj->ij", reads, reads)) @ projections[k])
        basis = top_row_space(torch.cat(blocks), hd)  # (width, hd)
        new_v[g, :, :width] = torch.linalg.solve_triangular(lower.T, basis, upper=True).T
        for k in group:
            transform = projections[k] @ basis  # (hd, hd): old value = transform @ new value
            new_o[:, readers[k], :] = torch.einsum("oni,ij->onj", attention.o[:, readers[k], :], transform)
        if per_head is not None:
            heads = [(h, k) for k in group for h in readers[k]]
            shared, head_blocks = alternate(attention, per_head, heads, new_v[g, :, :width])
            new_v[g, :, :width] = shared
            new_o[:, [h for h, _ in heads], :] = head_blocks.transpose(0, 1)
    return new_v, new_o


# A target A_h = left_h @ right_h, as its factors: (n, d_out, r) and (n, r, width); for o_h W_v,k the
# inner size r is hd, so the (n, d_out, width) products (tens of GB for a 70B shape) are never formed
Factored = tuple[torch.Tensor, torch.Tensor]


def value_objective(targets: Factored, moments: torch.Tensor, blocks: torch.Tensor, shared: torch.Tensor) -> float:
    """sum_h tr((A_h - C_h W) M_h (A_h - C_h W)^T), expanded in the factors of A_h."""
    left, right = targets
    fitted = shared @ moments  # (n, hd, width): W M_h
    target_term = torch.einsum("nab,nab->", left.transpose(1, 2) @ left, right @ moments @ right.transpose(1, 2))
    cross = torch.einsum("nab,nba->", left.transpose(1, 2) @ blocks, fitted @ right.transpose(1, 2))
    fit_term = torch.einsum("nab,nba->", blocks.transpose(1, 2) @ blocks, fitted @ shared.T)
    return float(target_term - 2 * cross + fit_term)


def alternate(
    attention: Attention, per_head: torch.Tensor, heads: list[tuple[int, int]], shared: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The alternating solve for one group (module docstring). heads: (query head, its source kv head);
    shared: the starting W_v (hd, width). Returns W_v and the o blocks C_h (n, d_out, hd)."""
    width = shared.shape[1]
    order = [h for h, _ in heads]
    if order == list(range(len(per_head))):  # every head in order (MQA): a view, not a copy of tens of GB
        moments = per_head if attention.v_bias else per_head[:, :-1, :-1]
    else:
        moments = torch.stack([restrict(per_head[h], attention.v_bias) for h in order])  # (n, width, width)
    targets = attention.o[:, order, :].transpose(0, 1), attention.v[[k for _, k in heads], :, :width]
    blocks = best_blocks(targets, moments, shared)
    for _ in range(VALUE_ROUNDS):
        shared = solve_shared(targets, moments, blocks, shared)
        blocks = best_blocks(targets, moments, shared)
    return shared, blocks


def best_blocks(targets: Factored, moments: torch.Tensor, shared: torch.Tensor) -> torch.Tensor:
    """C_h = A_h M_h W^T (W M_h W^T)^-1 for every head: (n, d_out, hd)."""
    left, right = targets
    projected = shared @ moments  # (n, hd, width): W M_h
    gram = projected @ shared.T  # (n, hd, hd)
    scale = RIDGE * gram.diagonal(dim1=-2, dim2=-1).mean(-1).clamp_min(1e-300)
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    rhs = (projected @ right.transpose(1, 2)) @ left.transpose(1, 2)  # (n, hd, d_out): W M_h A_h^T
    return torch.linalg.solve(gram + scale[:, None, None] * eye, rhs).transpose(1, 2)


def solve_shared(targets: Factored, moments: torch.Tensor, blocks: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """W minimising sum_h ||(A_h - C_h W) L_h||^2 given the C_h: conjugate gradients on
    sum_h P_h W M_h = R (P_h = C_h^T C_h), preconditioned by (mean P)^-1 . (mean M)^-1, from `start`."""
    left, right = targets
    outer = blocks.transpose(1, 2) @ blocks  # (n, hd, hd)
    rhs = ((blocks.transpose(1, 2) @ left) @ (right @ moments)).sum(0)  # (hd, width)

    def apply(x: torch.Tensor) -> torch.Tensor:
        return (outer @ x @ moments).sum(0)

    left, right = cholesky(outer.mean(0)), cholesky(moments.mean(0))

    def precondition(r: torch.Tensor) -> torch.Tensor:
        return torch.cholesky_solve(torch.cholesky_solve(r, left).T, right).T

    x = start.clone()
    residual = rhs - apply(x)
    limit = CG_TOLERANCE * float(rhs.norm())
    if not float(residual.norm()) > limit:
        return x
    z = precondition(residual)
    direction = z.clone()
    rz = float((residual * z).sum())
    for _ in range(CG_STEPS):
        image = apply(direction)
        curvature = float((direction * image).sum())
        if not curvature > 0:
            break
        step = rz / curvature
        x = x + step * direction
        residual = residual - step * image
        if not float(residual.norm()) > limit:
            break
        z = precondition(residual)
        rz, previous = float((residual * z).sum()), rz
        direction = z + (rz / previous) * direction
    return x
