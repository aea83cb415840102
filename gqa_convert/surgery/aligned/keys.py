"""K merges under RoPE: the complex per-pair merge and the frequency-aware low-band merge.

RoPE rotates each pair (a, b) of a head as one complex number by position x theta. The logit of
query head h between positions m >= n is sum over pairs of Re(conj(q_h(x_m)) k(x_n) e^{-i (m-n) theta}).

Complex merge (every pair): a change of K commutes with the rotation only as one complex scale per
pair. Per pair, the shared key w . x is the best rank-one fit of the group's complex keys b_k . x,
weighted by the energy of the queries that read them; each head's key is approximated by
beta_k (w . x) and the query heads reading head k absorb conj(beta_k) into their pair. Exact when
the merged heads differ by a complex scale per pair.

Low band (pairs whose rotation over the calibration length is small, theta T <= band_angle, and the
dimensions outside the rotary part, which never rotate): there the rotation is close to the identity,
so the band's logit is the bilinear form x_m^T W_q,h,B^T W_k,B x_n and a query head may absorb any
linear map of the shared key's band, as o_proj does for V. In whitened coordinates (E_k = W_k,B L_k,
L_k L_k^T = the centred key moment: a logit term equal for every key of a query is ignored by the
softmax), the shared band spans the top right singular vectors P of the stacked C_k E_k
(C_k^T C_k = the query Gram of the heads reading k); its basis G P^T inside that span is the one
closest to the complex merge ("projection": G = the complex merge's whitened band on P, exact for
copies; "polar": the nearest scaled orthogonal G, well conditioned), and each query head's band
becomes G^-T P^T E_k^T q_B.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from gqa_convert.errors import GQAConvertError
from gqa_convert.surgery.aligned.attention import Attention
from gqa_convert.surgery.aligned.linalg import Groups, Readers, cholesky, psd_root, top_row_space

GAUGES = ("projection", "polar")


def rotary_pairs(head_dim: int, rotary_dim: int, interleaved: bool = False) -> list[tuple[int, int]]:
    """The dimension pairs RoPE rotates together, then the non-rotary dimensions paired alike."""
    half = rotary_dim // 2
    rotary = [(2 * i, 2 * i + 1) for i in range(half)] if interleaved else [(i, i + half) for i in range(half)]
    rest = head_dim - rotary_dim
    return rotary + [(rotary_dim + j, rotary_dim + j + rest // 2) for j in range(rest // 2)]


def pair_rotations(kwargs: dict[str, Any], pairs: Sequence[tuple[int, int]], rotary_dim: int) -> torch.Tensor:
    """Per pair, the angle (rad) it rotates over the calibration window, read from the layer's own
    rotary tables (so scaled RoPE variants are covered); 0 for dimensions outside the rotary part."""
    tables = kwargs.get("position_embeddings")
    if not isinstance(tables, tuple) or len(tables) != 2:
        raise GQAConvertError(
            "the frequency-aware K merge reads the layer's rotary tables, which this model does not pass "
            "to its layers: use a recipe whose aligned.key_merge is complex (e.g. --recipe closed-form)"
        )
    cos, sin = (table.reshape(-1, table.shape[-2], table.shape[-1])[0].double() for table in tables)
    length = cos.shape[0]
    if length < 2:
        raise GQAConvertError("--calib-seq-len must be at least 2 for the frequency-aware K merge")
    angles = []
    for a, _ in pairs:
        step = math.atan2(float(sin[1, a]), float(cos[1, a])) if a < rotary_dim else 0.0
        angles.append(abs(step) * length)
    return torch.tensor(angles, dtype=torch.float64)


def _width(attention: Attention, bias: bool) -> int:
    return attention.k.shape[2] if bias else attention.k.shape[2] - 1


def _complex_inner(a_re, a_im, s, b_re, b_im) -> tuple[torch.Tensor, torch.Tensor]:
    """conj(a) s b^T for complex rows a = a_re + i a_im, b likewise: (real part, imaginary part)."""
    real = a_re @ s @ b_re.T + a_im @ s @ b_im.T
    imag = a_re @ s @ b_im.T - a_im @ s @ b_re.T
    return real, imag


def _query_energy(attention: Attention, moment: torch.Tensor) -> torch.Tensor:
    """(nh, hd): q_h,r^T S q_h,r per query head and row."""
    return torch.einsum("nrd,de,nre->nr", attention.q, moment, attention.q).clamp_min(0)


def merge_keys_complex(
    attention: Attention, moment: torch.Tensor, groups: Groups, readers: Readers, pairs: Sequence[tuple[int, int]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """New K heads (G, hd, d) and new query heads (nh, hd, d): the complex merge on every pair."""
    width = _width(attention, attention.k_bias)
    s = moment[:width, :width] if attention.k_bias else moment[:-1, :-1]
    s = s + 1e-6 * s.diagonal().mean() * torch.eye(len(s), dtype=s.dtype, device=s.device)
    energy_rows = _query_energy(attention, moment)
    new_k = torch.zeros(len(groups), *attention.k.shape[1:], dtype=torch.float64, device=attention.k.device)
    new_q = attention.q.clone()
    for i, j in pairs:
        for g, group in enumerate(groups):
            re, im = attention.k[list(group), i, :width], attention.k[list(group), j, :width]
            energy = torch.stack([energy_rows[readers[k]][:, [i, j]].sum() for k in group]).sqrt()
            weights = energy + 1e-30
            g_re, g_im = _complex_inner(re, im, s, re, im)
            gram = torch.complex(g_re, g_im) * (weights[:, None] * weights[None, :])
            top = torch.linalg.eigh(gram)[1][:, -1]
            coefficients = weights.to(torch.complex128) * top
            shared_re = coefficients.real @ re - coefficients.imag @ im
            shared_im = coefficients.real @ im + coefficients.imag @ re
            shared_energy = _complex_inner(shared_re[None], shared_im[None], s, shared_re[None], shared_im[None])[0]
            scale = (g_re.diagonal().mean() / shared_energy.squeeze().clamp_min(1e-300)).sqrt()
            shared_re, shared_im = shared_re * scale, shared_im * scale  # keep the keys' scale
            shared_energy = shared_energy.squeeze() * scale**2
            beta_re, beta_im = _complex_inner(shared_re[None], shared_im[None], s, re, im)
            beta_re, beta_im = (
                beta_re[0] / shared_energy.clamp_min(1e-300),
                beta_im[0] / shared_energy.clamp_min(1e-300),
            )
            new_k[g, i, :width], new_k[g, j, :width] = shared_re, shared_im
            for position, k in enumerate(group):
                a, b = beta_re[position], beta_im[position]
                qi, qj = attention.q[readers[k], i], attention.q[readers[k], j]
                new_q[readers[k], i] = a * qi + b * qj
                new_q[readers[k], j] = a * qj - b * qi
    return new_k, new_q


def key_moment(moment: torch.Tensor, mean: torch.Tensor, tokens: int, bias: bool) -> torch.Tensor:
    """The centred key moment S - n mu mu^T, over [x, 1] with a key bias, over x alone without."""
    centred = moment - tokens * torch.outer(mean, mean)
    return centred if bias else centred[:-1, :-1]


def merge_band(
    attention: Attention,
    moments: tuple[torch.Tensor, torch.Tensor],
    groups: Groups,
    readers: Readers,
    band: list[tuple[int, int]],
    complex_merge: tuple[torch.Tensor, torch.Tensor],
    gauge: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The complex merge with the band's rows replaced by the low-band merge. moments: (the query
    moment over [x, 1], the centred key moment over the key's input width)."""
    query_moment, centred = moments
    new_k, new_q = complex_merge[0].clone(), complex_merge[1].clone()
    rows = [a for a, _ in band] + [b for _, b in band]
    width = len(centred)
    lower = cholesky(centred)
    for g, group in enumerate(groups):
        whitened = {k: attention.k[k, rows, :width] @ lower for k in group}  # E_k: (r, width)
        blocks = []
        for k in group:
            q_rows = attention.q[readers[k]][:, rows]  # (n, r, d)
            query_gram = torch.einsum("nad,de,nbe->ab", q_rows, query_moment, q_rows)
            blocks.append(psd_root(query_gram) @ whitened[k])
        basis = top_row_space(torch.cat(blocks), len(rows))  # P: (width, r)
        reference = complex_merge[0][g, rows, :width] @ lower
        frame = reference @ basis  # the new key's band is frame @ P^T L^-1
        if gauge == "polar":
            u, _, vh = torch.linalg.svd(frame)
            frame = u @ vh * (frame.pow(2).sum() / len(rows)).sqrt()
        new_k[g][rows, :width] = torch.linalg.solve_triangular(lower.T, basis @ frame.T, upper=True).T
        inverse_t = torch.linalg.pinv(frame).T
        for k in group:
            absorb = inverse_t @ basis.T @ whitened[k].T  # (r, r): q'_B = absorb @ q_B
            for h in readers[k]:
                new_q[h, rows] = absorb @ attention.q[h, rows]
    return new_k, new_q
