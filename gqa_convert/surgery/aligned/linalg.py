"""The linear algebra the calibrated merges share.

Notation: d = hidden size + 1 (a constant input of 1 carries the biases), hd = head_dim,
S = the calibration second moment of [x, 1] (d x d), L its Cholesky factor.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

RIDGE = 1e-6  # relative ridge on S: calibration never spans every direction of a large model
RIDGE_RETRIES = 4  # up to 1e-3 relative, then the last try at 1e-2 raises if it still fails

Groups = Sequence[Sequence[int]]
Readers = dict[int, list[int]]  # source kv head -> the query heads that read it


def cholesky(moment: torch.Tensor) -> torch.Tensor:
    """Lower L with L L^T = moment + ridge. The ridge grows (x10, at most 1e-2 relative) while the
    factorization fails: moments accumulated in float32 (the attended one) can be indefinite by
    rounding in the directions short calibration never spans."""
    scale = RIDGE * moment.diagonal().mean().clamp_min(1e-12)
    eye = torch.eye(len(moment), dtype=moment.dtype, device=moment.device)
    for _ in range(RIDGE_RETRIES):
        lower, info = torch.linalg.cholesky_ex(moment + scale * eye)
        if int(info) == 0:
            return lower
        scale = scale * 10
    return torch.linalg.cholesky(moment + scale * eye)  # raises, naming the failing minor


def restrict(moment: torch.Tensor, keep_bias: bool) -> torch.Tensor:
    """Without a bias the constant input cannot be used: work in x alone."""
    return moment if keep_bias else moment[:-1, :-1]


def psd_root(gram: torch.Tensor) -> torch.Tensor:
    """C with C^T C = gram (gram symmetric positive semi-definite)."""
    values, vectors = torch.linalg.eigh(gram)
    return values.clamp_min(0).sqrt()[:, None] * vectors.T


def top_row_space(stacked: torch.Tensor, rank: int) -> torch.Tensor:
    """(width, rank): an orthonormal basis of the top-`rank` right singular vectors of `stacked`, i.e.
    the top eigenvectors of stacked^T stacked, at the cost of an SVD of the short side."""
    return torch.linalg.svd(stacked, full_matrices=False)[2][:rank].T


def repeat_by_group(heads: torch.Tensor, groups: Groups, old_kv: int) -> torch.Tensor:
    """(G, ...) merged heads -> (old_kv, ...): every member of a group gets the group's head."""
    index = torch.empty(old_kv, dtype=torch.long)
    for g, group in enumerate(groups):
        index[list(group)] = g
    return heads[index.to(heads.device)]


def first_of_group(heads: torch.Tensor, groups: Groups) -> torch.Tensor:
    """(old_kv, ...) heads repeated by group -> (G, ...)."""
    return heads[[group[0] for group in groups]]
