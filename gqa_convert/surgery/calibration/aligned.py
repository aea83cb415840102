"""The calibrated merge (`--method aligned`): per layer, a closed-form least-squares merge of each
group's K/V heads that keeps what the heads compute, with the per-head maps absorbed into the query
and output projections (which stay per query head, so they are free to change).

Notation: d = hidden size (+1 for the constant input that carries biases), hd = head_dim,
S = calibration second moment of [x, 1] (d x d), L its Cholesky factor.

V (no RoPE): query head h outputs W_o,h W_v,k(h) x. A shared W_v and new W_o,h blocks minimise
sum_h ||(W_o,h W_v,k(h) - C_h W_v) X||^2: with E_k = W_v,k L and P the top-hd eigenvectors of
sum_k E_k^T (sum_{h reads k} W_o,h^T W_o,h) E_k, W_v = P^T L^-1 and C_h = W_o,h E_k(h) P.

K (RoPE): RoPE rotates each pair (i, i + r/2) of a head as a complex number, so a transform of K
commutes with it only as one complex scale per frequency. Per frequency, each head's key is
b_k . x (b_k complex); the shared key w . x is the best rank-one fit of the heads' keys weighted by
their queries' energy, and each head's key is approximated by beta_k (w . x). The query heads that
read head k absorb conj(beta_k) into their pair. Dimensions outside the rotary part are paired the
same way (any pairing commutes with the identity).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

RIDGE = 1e-6  # relative ridge on S: calibration never spans every direction of a large model


@dataclass
class Attention:
    """One layer's attention as separate per-head projections, float64, biases as a last column.

    q: (nh, hd, d); k, v: (nkv, hd, d); o: (d_out, nh, hd). d includes the constant column; a
    projection without bias has zeros there and must keep them (`has_bias`)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: bool
    k_bias: bool
    v_bias: bool


def cholesky(moment: torch.Tensor) -> torch.Tensor:
    scale = RIDGE * moment.diagonal().mean().clamp_min(1e-12)
    return torch.linalg.cholesky(moment + scale * torch.eye(len(moment), dtype=moment.dtype))


def _restrict(moment: torch.Tensor, keep_bias: bool) -> torch.Tensor:
    """Without a bias the constant input cannot be used: work in x alone."""
    return moment if keep_bias else moment[:-1, :-1]


Groups = Sequence[Sequence[int]]
Readers = dict[int, list[int]]  # source kv head -> the query heads that read it


def merge_values(
    attention: Attention, moment: torch.Tensor, groups: Groups, readers: Readers
) -> tuple[torch.Tensor, torch.Tensor]:
    """New V heads (G, hd, d) and new o_proj blocks (d_out, nh, hd)."""
    hd = attention.v.shape[1]
    width = attention.v.shape[2] if attention.v_bias else attention.v.shape[2] - 1
    lower = cholesky(_restrict(moment, attention.v_bias))
    new_v = torch.zeros(len(groups), hd, attention.v.shape[2], dtype=torch.float64)
    new_o = attention.o.clone()
    for g, group in enumerate(groups):
        projections = {k: attention.v[k, :, :width] @ lower for k in group}  # E_k: (hd, width)
        outer = torch.zeros(width, width, dtype=torch.float64)
        for k in group:
            reads = attention.o[:, readers[k], :]  # (d_out, n_read, hd)
            gram = torch.einsum("oni,onj->ij", reads, reads)
            outer += projections[k].T @ gram @ projections[k]
        _, vectors = torch.linalg.eigh(outer)
        basis = vectors[:, -hd:]  # (width, hd), top hd
        new_v[g, :, :width] = torch.linalg.solve_triangular(lower.T, basis, upper=True).T
        for k in group:
            transform = projections[k] @ basis  # (hd, hd): old value = transform @ new value
            new_o[:, readers[k], :] = torch.einsum("oni,ij->onj", attention.o[:, readers[k], :], transform)
    return new_v, new_o


def rotary_pairs(head_dim: int, rotary_dim: int) -> list[tuple[int, int]]:
    half = rotary_dim // 2
    rotary = [(i, i + half) for i in range(half)]
    rest = head_dim - rotary_dim
    return rotary + [(rotary_dim + j, rotary_dim + j + rest // 2) for j in range(rest // 2)]


def merge_keys(
    attention: Attention, moment: torch.Tensor, groups: Groups, readers: Readers, rotary_dim: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """New K heads (G, hd, d) and new query heads (nh, hd, d)."""
    hd = attention.k.shape[1]
    keep_bias = attention.k_bias
    width = attention.k.shape[2] if keep_bias else attention.k.shape[2] - 1
    s = _restrict(moment, keep_bias)
    s = s + RIDGE * s.diagonal().mean() * torch.eye(len(s), dtype=s.dtype)
    new_k = torch.zeros(len(groups), hd, attention.k.shape[2], dtype=torch.float64)
    new_q = attention.q.clone()
    q_width = attention.q.shape[2] if attention.q_bias else attention.q.shape[2] - 1
    s_q = _restrict(moment, attention.q_bias)
    for i, j in rotary_pairs(hd, rotary_dim):
        for g, group in enumerate(groups):
            keys = torch.stack([torch.complex(attention.k[k, i, :width], attention.k[k, j, :width]) for k in group])
            energy = []
            for k in group:
                q = attention.q[readers[k], :, :q_width]
                pair_energy = torch.einsum("ni,ij,nj->", q[:, i], s_q, q[:, i])
                pair_energy = pair_energy + torch.einsum("ni,ij,nj->", q[:, j], s_q, q[:, j])
                energy.append(pair_energy.clamp_min(0).sqrt())
            weights = torch.stack(energy).to(torch.complex128) + 1e-30
            s_c = s.to(torch.complex128)
            gram = weights[:, None] * (keys.conj() @ s_c @ keys.T) * weights[None, :]
            _, vectors = torch.linalg.eigh(gram)
            top = vectors[:, -1]
            shared = (weights * top) @ keys  # w: (width,)
            key_energy = torch.einsum("ki,ij,kj->k", keys.conj(), s_c, keys).real
            shared_energy = (shared.conj() @ s_c @ shared).real.clamp_min(1e-300)
            shared = shared * (key_energy.mean() / shared_energy).sqrt()  # keep the keys' scale
            shared_energy = (shared.conj() @ s_c @ shared).real.clamp_min(1e-300)
            betas = (shared.conj() @ s_c @ keys.T) / shared_energy  # (g,)
            new_k[g, i, :width], new_k[g, j, :width] = shared.real, shared.imag
            for position, k in enumerate(group):
                a, b = betas[position].real, betas[position].imag
                qi, qj = attention.q[readers[k], i].clone(), attention.q[readers[k], j].clone()
                new_q[readers[k], i] = a * qi + b * qj
                new_q[readers[k], j] = a * qj - b * qi
    return new_k, new_q


def aligned_merge(
    attention: Attention, moment: torch.Tensor, groups: Groups, readers: Readers, rotary_dim: int, key_norm: bool
) -> Attention:
    """The whole layer: V merged and absorbed into o_proj, K merged and absorbed into the queries.
    With a norm applied to K after the projection (key_norm) no change of K commutes with it: K is
    mean-pooled and the queries stay as they are."""
    new_v, new_o = merge_values(attention, moment, groups, readers)
    if key_norm:
        new_k = torch.stack([attention.k[list(group)].mean(0) for group in groups])
        new_q = attention.q
    else:
        new_k, new_q = merge_keys(attention, moment, groups, readers, rotary_dim)
    return Attention(new_q, new_k, new_v, new_o, attention.q_bias, attention.k_bias, attention.v_bias)


# (attention, second moment, groups, readers, rotary dim, key norm) -> the merged attention
LayerMergeFn = Callable[[Attention, torch.Tensor, Groups, Readers, int, bool], Attention]
