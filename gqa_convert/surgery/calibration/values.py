"""The V merge: a shared V projection per group, each query head's o_proj block absorbing its map.

Query head h outputs W_o,h sum_n a_h(m, n) W_v,k(h) x_n. A shared W_v and new o blocks C_h minimise
sum_h ||(W_o,h W_v,k(h) - C_h W_v) Z||^2 over the calibration data Z, whose second moment is either the
plain moment of the inputs x or the attended moment (the moment of z_h,m = sum_n a_h(m, n) x_n, what
the values are actually averaged over, which is smoother and lower-rank than x). With E_k = W_v,k L
(L L^T = the moment), the shared head spans the top-hd right singular vectors P of the stacked
C_k E_k (C_k^T C_k = sum_{h reads k} W_o,h^T W_o,h): W_v = P^T L^-1 and C_h = W_o,h E_k(h) P.
Exact when the merged heads are copies.
"""

from __future__ import annotations

import torch

from gqa_convert.surgery.calibration.linalg import (
    Attention,
    Groups,
    Readers,
    cholesky,
    psd_root,
    restrict,
    top_row_space,
)


def merge_values(
    attention: Attention, moment: torch.Tensor, groups: Groups, readers: Readers
) -> tuple[torch.Tensor, torch.Tensor]:
    """New V heads (G, hd, d) and new o_proj blocks (d_out, nh, hd)."""
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
    return new_v, new_o
