"""The layout mechanism on hand-made tensors: every layout is viewed as stacked kv heads, merged or
copied, and laid out again; the expected results are built here by explicit slicing."""

from __future__ import annotations

import torch

from gqa_convert.arch import KvTensor, Layout, TensorKind
from gqa_convert.surgery.layouts import permute_query_tensor, regroup_per_head, regroup_tensor
from gqa_convert.surgery.methods import merge_mean
from gqa_convert.surgery.plan import HeadPlan, contiguous_groups, expand_groups

NH, NKV, HD, D = 4, 2, 3, 5


def plan(groups, merge=merge_mean, query_order=None, old_kv=NKV) -> HeadPlan:
    return HeadPlan(NH, old_kv, groups, HD, merge=merge, query_order=query_order)


def test_rows_merge_each_group_and_expand_copies():
    weight = torch.randn(NKV * HD, D)
    entry = KvTensor("k.weight", Layout.ROWS, TensorKind.WEIGHT)
    merged = regroup_tensor(entry, weight, plan(contiguous_groups(NKV, 1)), "k")
    torch.testing.assert_close(merged, (weight[:HD] + weight[HD:]) / 2)
    expanded = regroup_tensor(entry, weight, plan(expand_groups(NKV, NH)), "k")
    heads = [weight[:HD], weight[:HD], weight[HD:], weight[HD:]]  # query j reads kv head j // 2
    torch.testing.assert_close(expanded, torch.cat(heads), atol=0, rtol=0)
    bias = torch.randn(NKV * HD)
    torch.testing.assert_close(
        regroup_tensor(KvTensor("k.bias", Layout.ROWS, TensorKind.BIAS), bias, plan(((1, 0),)), "k"),
        (bias[:HD] + bias[HD:]) / 2,
    )


def test_fused_concat_keeps_queries_and_merges_k_and_v():
    q, k, v = torch.randn(NH * HD, D), torch.randn(NKV * HD, D), torch.randn(NKV * HD, D)
    entry = KvTensor("qkv.weight", Layout.FUSED_CONCAT, TensorKind.WEIGHT)
    out = regroup_tensor(entry, torch.cat([q, k, v]), plan(contiguous_groups(NKV, 1)), "qkv")
    assert out.shape == ((NH + 2) * HD, D)
    torch.testing.assert_close(out[: NH * HD], q, atol=0, rtol=0)
    torch.testing.assert_close(out[NH * HD : (NH + 1) * HD], (k[:HD] + k[HD:]) / 2)
    torch.testing.assert_close(out[(NH + 1) * HD :], (v[:HD] + v[HD:]) / 2)


def test_fused_concat_permutes_query_heads():
    q, k, v = torch.randn(NH * HD, D), torch.randn(NKV * HD, D), torch.randn(NKV * HD, D)
    entry = KvTensor("qkv.weight", Layout.FUSED_CONCAT, TensorKind.WEIGHT)
    order = (2, 3, 0, 1)
    out = regroup_tensor(entry, torch.cat([q, k, v]), plan(((1,), (0,)), query_order=order), "qkv")
    expected_q = torch.cat([q[h * HD : (h + 1) * HD] for h in order])
    torch.testing.assert_close(out[: NH * HD], expected_q, atol=0, rtol=0)
    torch.testing.assert_close(out[NH * HD : (NH + 1) * HD], k[HD:], atol=0, rtol=0)  # group 0 is old head 1


def test_fused_grouped_lays_out_queries_k_v_per_group():
    per = NH // NKV
    grouped = torch.randn(NKV, per + 2, HD, D)  # per kv head: its queries, then K, then V
    entry = KvTensor("qkv.weight", Layout.FUSED_GROUPED, TensorKind.WEIGHT)
    out = regroup_tensor(entry, grouped.reshape(-1, D), plan(contiguous_groups(NKV, 1)), "qkv")
    out = out.reshape(1, NH + 2, HD, D)
    torch.testing.assert_close(out[0, :NH], grouped[:, :per].reshape(NH, HD, D), atol=0, rtol=0)
    torch.testing.assert_close(out[0, NH], grouped[:, per].mean(0))
    torch.testing.assert_close(out[0, NH + 1], grouped[:, per + 1].mean(0))
    mha = regroup_tensor(entry, grouped.reshape(-1, D), plan(expand_groups(NKV, NH)), "qkv").reshape(NH, 3, HD, D)
    for j in range(NH):  # MHA: each query head with its own copy of the K and V it read
        torch.testing.assert_close(mha[j, 0], grouped[j // per, j % per], atol=0, rtol=0)
        torch.testing.assert_close(mha[j, 1], grouped[j // per, per], atol=0, rtol=0)


def test_per_head_tensors_merge_as_a_list():
    norms = [torch.randn(HD) for _ in range(NKV)]
    entry = KvTensor("norms.{head}.weight", Layout.PER_HEAD, TensorKind.NORM)
    (merged,) = regroup_per_head(entry, norms, plan(contiguous_groups(NKV, 1)), "norms")
    torch.testing.assert_close(merged, (norms[0] + norms[1]) / 2)


def test_query_permutation_of_rows_and_columns_is_exact_and_invertible():
    q, o = torch.randn(NH * HD, D), torch.randn(D, NH * HD)
    order = (3, 1, 0, 2)
    moved_q = permute_query_tensor(q, 0, NH, order)
    moved_o = permute_query_tensor(o, 1, NH, order)
    for position, head in enumerate(order):
        torch.testing.assert_close(moved_q[position * HD : (position + 1) * HD], q[head * HD : (head + 1) * HD])
        torch.testing.assert_close(moved_o[:, position * HD : (position + 1) * HD], o[:, head * HD : (head + 1) * HD])
    # o @ q is a sum over heads: the same under any order
    torch.testing.assert_close(moved_o @ moved_q, o @ q, atol=1e-5, rtol=1e-5)
    inverse = plan(((0,), (1,)), query_order=order).inverse_query_order()
    torch.testing.assert_close(permute_query_tensor(moved_q, 0, NH, inverse), q, atol=0, rtol=0)


def test_meta_tensors_give_the_output_shapes():
    entry = KvTensor("qkv.weight", Layout.FUSED_CONCAT, TensorKind.WEIGHT)
    meta = torch.empty((NH + 2 * NKV) * HD, D, device="meta")
    out = regroup_tensor(entry, meta, plan(contiguous_groups(NKV, 1)), "qkv")
    assert out.is_meta and out.shape == ((NH + 2) * HD, D)
