"""Similarity grouping: which kv heads merge well, measured after alignment, and equal-size groups
chosen greedily from it."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gqa_convert.calibration import LayerStatistics
from gqa_convert.surgery.aligned.attention import Attention
from gqa_convert.surgery.aligned.linalg import cholesky


def head_similarity(attention: Attention, moment: torch.Tensor, pairs: Sequence[tuple[int, int]]) -> torch.Tensor:
    """(nkv, nkv) in [0, 1]: how well two kv heads share one head, after alignment. V: mean squared
    cosine of the principal angles between their whitened value subspaces. K: per RoPE pair, the
    squared correlation of their complex keys (a complex scale aligns them), averaged."""
    nkv, hd, _ = attention.v.shape
    lower = cholesky(moment)
    bases = [torch.linalg.qr((attention.v[k] @ lower).T).Q for k in range(nkv)]  # (width, hd)
    value = torch.stack(
        [torch.stack([(bases[a].T @ bases[b]).pow(2).sum() / hd for b in range(nkv)]) for a in range(nkv)]
    )
    key = torch.zeros(nkv, nkv, dtype=torch.float64, device=moment.device)
    s = moment.to(torch.complex128)
    for i, j in pairs:
        keys = torch.complex(attention.k[:, i], attention.k[:, j])  # (nkv, width)
        cross = keys.conj() @ s @ keys.T
        energy = cross.diagonal().real.clamp_min(1e-300)
        key += cross.abs().pow(2) / (energy[:, None] * energy[None, :])
    return (value + key / len(pairs)) / 2


def similar_groups(similarity: torch.Tensor, kv_heads: int) -> tuple[tuple[int, ...], ...]:
    """Equal-size groups, greedy: the lowest free head takes the free heads most similar to it."""
    size = len(similarity) // kv_heads
    free = list(range(len(similarity)))
    groups = []
    while free:
        seed = free.pop(0)
        ranked = sorted(free, key=lambda other: (-float(similarity[seed, other]), other))
        members = sorted([seed, *ranked[: size - 1]])
        free = [head for head in free if head not in members]
        groups.append(tuple(members))
    return tuple(groups)


def groups_by_similarity(
    attention: Attention, statistics: LayerStatistics, pairs: Sequence[tuple[int, int]], kv_heads: int
) -> tuple[tuple[int, ...], ...]:
    return similar_groups(head_similarity(attention, statistics.moment, pairs), kv_heads)
