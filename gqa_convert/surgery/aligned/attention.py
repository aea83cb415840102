"""One layer's attention as per-head float64 tensors (read from the checkpoint, written back as its
tensors), and everything a calibrated merge of that layer gets (LayerInputs)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace

import torch

from gqa_convert.calibration import LayerStatistics
from gqa_convert.io.sources import Checkpoint
from gqa_convert.surgery.aligned.linalg import first_of_group, repeat_by_group
from gqa_convert.surgery.plan import HeadPlan


@dataclass(frozen=True)
class Attention:
    """One layer's attention as separate per-head projections, float64, biases as a last column.

    q: (nh, hd, d); k, v: (nkv, hd, d); o: (d_out, nh, hd). A projection without bias has zeros in
    the last column and must keep them (`*_bias` False)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    o: torch.Tensor
    q_bias: bool
    k_bias: bool
    v_bias: bool

    def to(self, device: str | torch.device) -> Attention:
        return replace(self, q=self.q.to(device), k=self.k.to(device), v=self.v.to(device), o=self.o.to(device))

    def as_tensors(self, names: Mapping[str, str], dtype_of: Callable[[str], torch.dtype]) -> dict[str, torch.Tensor]:
        """The projections as flat weight (and bias) tensors named names[role] + ".weight"/".bias"."""
        out = {}
        for role, heads, has_bias in (
            ("q", self.q, self.q_bias),
            ("k", self.k, self.k_bias),
            ("v", self.v, self.v_bias),
        ):
            flat = heads.reshape(-1, heads.shape[-1])
            out[names[role] + ".weight"] = flat[:, :-1].to(dtype_of(names[role] + ".weight")).contiguous()
            if has_bias:
                out[names[role] + ".bias"] = flat[:, -1].to(dtype_of(names[role] + ".bias")).contiguous()
        o_name = names["o"] + ".weight"
        out[o_name] = self.o.reshape(self.o.shape[0], -1).to(dtype_of(o_name)).contiguous()
        return out

    def repeated(self, groups: tuple[tuple[int, ...], ...], old_kv: int) -> Attention:
        """One kv head per group -> the source's layout: every member of a group gets the group's head."""
        return replace(self, k=repeat_by_group(self.k, groups, old_kv), v=repeat_by_group(self.v, groups, old_kv))

    def grouped(self, groups: tuple[tuple[int, ...], ...]) -> Attention:
        """The source's layout (kv heads repeated by group) -> one kv head per group."""
        return replace(self, k=first_of_group(self.k, groups), v=first_of_group(self.v, groups))


def attention_from(
    get: Callable[[str], torch.Tensor | None], names: Mapping[str, str], num_heads: int, kv_heads: int, hd: int
) -> Attention:
    """q/k/v/o as float64 heads (biases as a last column) from a tensor getter (None: absent)."""

    def heads(role: str, count: int) -> tuple[torch.Tensor, bool]:
        weight = get(names[role] + ".weight")
        assert weight is not None
        weight = weight.double()
        bias = get(names[role] + ".bias")
        column = bias.double() if bias is not None else torch.zeros(len(weight), dtype=torch.float64)
        return torch.cat([weight, column[:, None]], dim=1).reshape(count, hd, -1), bias is not None

    q, q_bias = heads("q", num_heads)
    k, k_bias = heads("k", kv_heads)
    v, v_bias = heads("v", kv_heads)
    o = get(names["o"] + ".weight")
    assert o is not None
    return Attention(q, k, v, o.double().reshape(-1, num_heads, hd), q_bias, k_bias, v_bias)


def read_attention(checkpoint: Checkpoint, layer: int, plan: HeadPlan) -> tuple[Attention, dict[str, str]]:
    """One layer's q/k/v/o as float64 heads (biases as a last column) and the projections' names."""
    arch = checkpoint.architecture
    assert arch.projections is not None
    prefix = arch.layer_prefix.format(layer=layer)
    names = {role: prefix + suffix for role, suffix in arch.projections.items()}

    def get(name: str) -> torch.Tensor | None:
        return checkpoint.get(name) if name in checkpoint.tensors else None

    return attention_from(get, names, plan.num_heads, plan.old_kv, plan.head_dim), names


@dataclass(frozen=True)
class LayerInputs:
    """What a calibrated method merges one layer from."""

    attention: Attention  # the source's weights, on the calibration device
    statistics: LayerStatistics
    plan: HeadPlan  # the groups (and the query order) of this layer
    pairs: tuple[tuple[int, int], ...]  # RoPE pairs, then the non-rotary dimensions paired (keys.rotary_pairs)
    rotary_dim: int
    key_norm: bool  # K is normalised after its projection: no change of K commutes with that
    # what the merged layer computes with besides q/k/v/o: the plan's merged k norms in the source's
    # layout, named inside the attention module (empty without kv-dependent norms)
    kv_norms: Mapping[str, torch.Tensor]

    @property
    def groups(self) -> tuple[tuple[int, ...], ...]:
        return self.plan.groups

    @property
    def readers(self) -> dict[int, list[int]]:
        return self.plan.readers()
