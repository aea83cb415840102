"""One mechanism for every layout: view a kv-dependent tensor as stacked kv heads, build the new heads
(merge a group for pool, copy for expand), and lay them out again. Works on meta tensors too, which is
how the converter learns every output shape before it writes a byte.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from gqa_convert.arch import KvTensor, Layout, TensorKind
from gqa_convert.surgery.plan import HeadPlan, MergeContext


def regroup_heads(heads: torch.Tensor, plan: HeadPlan, name: str, kind: TensorKind) -> torch.Tensor:
    """(old_kv, *head) -> (new_kv, *head)."""
    assert heads.shape[0] == plan.old_kv, (name, heads.shape, plan.old_kv)
    new = []
    for index, group in enumerate(plan.groups):
        context = MergeContext(f"{name}#{index}", kind, plan.seed, plan.init_std)
        new.append(plan.merge(heads[list(group)], context))
    return torch.stack(new)


def _rows(tensor: torch.Tensor, plan: HeadPlan, name: str, kind: TensorKind) -> torch.Tensor:
    block = tensor.shape[0] // plan.old_kv
    heads = tensor.reshape(plan.old_kv, block, *tensor.shape[1:])
    return regroup_heads(heads, plan, name, kind).reshape(plan.new_kv * block, *tensor.shape[1:])


def _permute_query_rows(queries: torch.Tensor, plan: HeadPlan) -> torch.Tensor:
    """queries: (nh, hd, *rest) in source order -> the order the plan asks for."""
    return queries if plan.query_order is None else queries[list(plan.query_order)]


def _fused_concat(tensor: torch.Tensor, plan: HeadPlan, name: str, kind: TensorKind) -> torch.Tensor:
    hd, rest = plan.head_dim, tensor.shape[1:]
    q, k, v = tensor.split([plan.num_heads * hd, plan.old_kv * hd, plan.old_kv * hd])
    q = _permute_query_rows(q.reshape(plan.num_heads, hd, *rest), plan).reshape(-1, *rest)
    return torch.cat([q, _rows(k, plan, name + ":k", kind), _rows(v, plan, name + ":v", kind)])


def _fused_grouped(tensor: torch.Tensor, plan: HeadPlan, name: str, kind: TensorKind) -> torch.Tensor:
    hd, rest = plan.head_dim, tensor.shape[1:]
    per_group = plan.num_heads // plan.old_kv
    grouped = tensor.reshape(plan.old_kv, per_group + 2, hd, *rest)
    queries = _permute_query_rows(grouped[:, :per_group].reshape(plan.num_heads, hd, *rest), plan)
    k = regroup_heads(grouped[:, per_group], plan, name + ":k", kind)
    v = regroup_heads(grouped[:, per_group + 1], plan, name + ":v", kind)
    queries = queries.reshape(plan.new_kv, plan.num_heads // plan.new_kv, hd, *rest)
    return torch.cat([queries, k.unsqueeze(1), v.unsqueeze(1)], dim=1).reshape(-1, *rest)


_LAYOUTS = {Layout.ROWS: _rows, Layout.FUSED_CONCAT: _fused_concat, Layout.FUSED_GROUPED: _fused_grouped}


def regroup_tensor(entry: KvTensor, tensor: torch.Tensor, plan: HeadPlan, name: str) -> torch.Tensor:
    """A single tensor whose first dimension holds every kv head (all layouts but PER_HEAD)."""
    return _LAYOUTS[entry.layout](tensor, plan, name, entry.kind)


def regroup_per_head(entry: KvTensor, tensors: Sequence[torch.Tensor], plan: HeadPlan, name: str) -> list[torch.Tensor]:
    """One tensor per kv head (PER_HEAD): a list of old_kv tensors in, new_kv tensors out."""
    assert entry.layout == Layout.PER_HEAD
    return list(regroup_heads(torch.stack(list(tensors)), plan, name, entry.kind).unbind(0))


def permute_query_tensor(
    tensor: torch.Tensor, dim: int, num_heads: int, query_order: Sequence[int] | None
) -> torch.Tensor:
    """q rows (dim 0) or o_proj input columns (dim 1) reordered by query head; exact."""
    if query_order is None:
        return tensor
    moved = tensor.movedim(dim, 0)
    heads = moved.reshape(num_heads, -1, *moved.shape[1:])[list(query_order)]
    return heads.reshape(moved.shape).movedim(0, dim).contiguous()
