"""The schema of an architecture row: which tensors of a decoder layer depend on the kv head count,
in which layout, and which are indexed by query head."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Layout(str, enum.Enum):
    """How a kv-dependent tensor is laid out along its first dimension."""

    ROWS = "rows"  # nkv equal blocks: k/v weights and biases, whole-width or (nkv, hd) k norms
    PER_HEAD = "per_head"  # one tensor per kv head, the suffix holds "{head}" (stablelm's k_layernorm)
    FUSED_CONCAT = "fused_concat"  # rows [Q nh*hd | K nkv*hd | V nkv*hd] (phi3 qkv_proj)
    FUSED_GROUPED = "fused_grouped"  # (nkv, nh/nkv + 2, hd): per group its queries, K, V (falcon)


class TensorKind(str, enum.Enum):
    """What a tensor is: decides how a method that does not average (random) initialises it."""

    WEIGHT = "weight"
    BIAS = "bias"
    NORM = "norm"
    NORM_BIAS = "norm_bias"


@dataclass(frozen=True)
class KvTensor:
    """One tensor of a decoder layer whose first dimension depends on the kv head count."""

    suffix: str  # relative to the layer prefix; optional tensors (biases, norms) may be absent
    layout: Layout
    kind: TensorKind

    def expected_rows(self, num_heads: int, kv_heads: int, head_dim: int) -> int:
        """Rows of the whole tensor the config implies (not for PER_HEAD tensors, one per head)."""
        assert self.layout != Layout.PER_HEAD
        if self.layout == Layout.ROWS:
            return kv_heads * head_dim
        return (num_heads + 2 * kv_heads) * head_dim

    def rows_of(self, shape: tuple[int, ...]) -> int:
        """Rows in the sense of expected_rows: a (nkv, hd) norm (cohere) counts nkv * hd."""
        if self.kind == TensorKind.NORM and len(shape) == 2:
            return shape[0] * shape[1]
        return shape[0]


@dataclass(frozen=True)
class QueryTensor:
    """A tensor indexed by query head: rows (q_proj) or input columns (o_proj)."""

    suffix: str
    dim: int  # 0: q rows / q bias; 1: o_proj input columns


@dataclass(frozen=True)
class Architecture:
    model_type: str
    layer_prefix: str  # with "{layer}"
    kv_tensors: tuple[KvTensor, ...]
    query_tensors: tuple[QueryTensor, ...]
    kv_config: str = "standard"  # key of arch.config_rules.KV_CONFIG_RULES
    kv_attribute: str = "num_key_value_heads"
    # other config fields that restate the kv count (the config class derives them; a saved config
    # carries them too): written alike, so that no reader finds a stale one
    kv_mirrors: tuple[str, ...] = ()
    # separate projections by role (q, k, v, o) for the calibrated merge; None for fused layouts
    projections: dict[str, str] | None = None
    # norms applied to K after the projection: the calibrated K merge does not commute with them
    key_norms: tuple[str, ...] = ("self_attn.k_norm.", "self_attn.k_layernorm.")
    # RoPE pairs dimensions (2i, 2i + 1) (cohere) rather than (i, i + rotary_dim / 2)
    rotary_interleaved: bool = False

    @property
    def attention_module(self) -> str:
        """The attention module's name inside a layer ("self_attn", "self_attention")."""
        return self.kv_tensors[0].suffix.split(".")[0]

    @property
    def layers_path(self) -> str:
        """The dotted path of the layer list ("model.layers")."""
        return self.layer_prefix.split(".{layer}")[0]

    def kv_tensor_for(self, layer_suffix: str) -> tuple[KvTensor, int | None] | None:
        """The row entry matching a tensor name (relative to its layer) and, for PER_HEAD, the head."""
        for entry in self.kv_tensors:
            if entry.layout != Layout.PER_HEAD:
                if layer_suffix == entry.suffix:
                    return entry, None
                continue
            head_prefix, head_suffix = entry.suffix.split("{head}")
            if layer_suffix.startswith(head_prefix) and layer_suffix.endswith(head_suffix):
                middle = layer_suffix[len(head_prefix) : len(layer_suffix) - len(head_suffix)]
                if middle.isdigit():
                    return entry, int(middle)
        return None

    def query_tensor_for(self, layer_suffix: str) -> QueryTensor | None:
        return next((entry for entry in self.query_tensors if entry.suffix == layer_suffix), None)
