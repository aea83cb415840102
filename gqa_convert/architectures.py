"""Supported attention layouts, described as data.

Each row says where a layer's tensors live and which of them depend on the kv head count, in which
layout. One general mechanism (gqa_convert.regroup) handles every layout; adding an architecture is
adding a row. Facts checked against transformers' modeling files (see tests/test_architectures.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from gqa_convert.errors import GQAConvertError

# How a kv-dependent tensor is laid out along its first dimension.
ROWS = "rows"  # nkv equal blocks: k/v weights and biases, whole-width or (nkv, hd) k norms
PER_HEAD = "per_head"  # one tensor per kv head, the suffix holds "{head}" (stablelm's k_layernorm)
FUSED_CONCAT = "fused_concat"  # rows [Q nh*hd | K nkv*hd | V nkv*hd] (phi3 qkv_proj)
FUSED_GROUPED = "fused_grouped"  # (nkv, nh/nkv + 2, hd): per group its queries, K, V (falcon)

# What a tensor is, which decides how a method that does not average (random) initialises it.
WEIGHT, BIAS, NORM, NORM_BIAS = "weight", "bias", "norm", "norm_bias"


@dataclass(frozen=True)
class KvTensor:
    """One tensor of a decoder layer whose first dimension depends on the kv head count."""

    suffix: str  # relative to the layer prefix; optional tensors (biases, norms) may be absent
    layout: str
    kind: str


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
    kv_config: str = "standard"  # key of KV_CONFIG_RULES
    kv_attribute: str = "num_key_value_heads"
    # separate projections by role (q, k, v, o) for the calibrated merge; None for fused layouts
    projections: dict[str, str] | None = None
    # norms applied to K after the projection: the calibrated K merge does not commute with them
    key_norms: tuple[str, ...] = ("self_attn.k_norm.", "self_attn.k_layernorm.")

    def kv_tensor_for(self, layer_suffix: str) -> tuple[KvTensor, int | None] | None:
        """The row entry matching a tensor name (relative to its layer) and, for PER_HEAD, the head."""
        for entry in self.kv_tensors:
            if entry.layout != PER_HEAD:
                if layer_suffix == entry.suffix:
                    return entry, None
                continue
            head_prefix, head_suffix = entry.suffix.split("{head}")
            if layer_suffix.startswith(head_prefix) and layer_suffix.endswith(head_suffix):
                middle = layer_suffix[len(head_prefix) : len(layer_suffix) - len(head_suffix)]
                if middle.isdigit():
                    return entry, int(middle)
        return None


def _separate(o_proj: str = "o_proj", extra: tuple[KvTensor, ...] = ()) -> dict[str, Any]:
    """Row fields for separate q/k/v/o projections, biases optional."""
    kv = tuple(
        KvTensor(f"self_attn.{proj}_proj.{param}", ROWS, WEIGHT if param == "weight" else BIAS)
        for proj in ("k", "v")
        for param in ("weight", "bias")
    )
    query = (
        QueryTensor("self_attn.q_proj.weight", 0),
        QueryTensor("self_attn.q_proj.bias", 0),
        QueryTensor(f"self_attn.{o_proj}.weight", 1),
    )
    projections = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": f"self_attn.{o_proj}"}
    return {"layer_prefix": "model.layers.{layer}.", "kv_tensors": kv + extra, "query_tensors": query,
            "projections": projections}


_PLAIN = (
    "llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite",
    "starcoder2", "mixtral", "qwen2_moe", "olmo",
)  # fmt: skip

ARCHITECTURES: dict[str, Architecture] = {name: Architecture(name, **_separate()) for name in _PLAIN}
ARCHITECTURES.update(
    {
        "phi": Architecture("phi", **_separate(o_proj="dense")),
        # olmo2: RMSNorm over the whole K width (nkv*hd); cohere: LayerNorm of shape (nkv, hd).
        "olmo2": Architecture("olmo2", **_separate(extra=(KvTensor("self_attn.k_norm.weight", ROWS, NORM),))),
        "cohere": Architecture("cohere", **_separate(extra=(KvTensor("self_attn.k_norm.weight", ROWS, NORM),))),
        "stablelm": Architecture(
            "stablelm",
            **_separate(
                extra=(
                    KvTensor("self_attn.k_layernorm.norms.{head}.weight", PER_HEAD, NORM),
                    KvTensor("self_attn.k_layernorm.norms.{head}.bias", PER_HEAD, NORM_BIAS),
                )
            ),
        ),
        "phi3": Architecture(
            "phi3",
            layer_prefix="model.layers.{layer}.",
            kv_tensors=(
                KvTensor("self_attn.qkv_proj.weight", FUSED_CONCAT, WEIGHT),
                KvTensor("self_attn.qkv_proj.bias", FUSED_CONCAT, BIAS),
            ),
            query_tensors=(QueryTensor("self_attn.o_proj.weight", 1),),
        ),
        "falcon": Architecture(
            "falcon",
            layer_prefix="transformer.h.{layer}.",
            kv_tensors=(
                KvTensor("self_attention.query_key_value.weight", FUSED_GROUPED, WEIGHT),
                KvTensor("self_attention.query_key_value.bias", FUSED_GROUPED, BIAS),
            ),
            query_tensors=(QueryTensor("self_attention.dense.weight", 1),),
            kv_config="falcon",
            kv_attribute="num_kv_heads",
        ),
    }
)

UNSUPPORTED: dict[str, str] = {
    **{
        name: "its attention class in transformers has no kv head count, so it cannot load a GQA checkpoint"
        for name in ("gpt2", "gpt_neox", "opt", "gptj", "bloom", "mpt")
    },
    "deepseek_v2": "it uses multi-head latent attention (MLA), which already compresses the KV cache",
    "deepseek_v3": "it uses multi-head latent attention (MLA), which already compresses the KV cache",
    "gpt_bigcode": "transformers supports it only as MHA or MQA (multi_query), not yet handled here",
}


def architecture_for(config_dict: dict[str, Any]) -> Architecture:
    """The row for a checkpoint's config.json, or a clear error naming what is supported."""
    model_type = config_dict.get("model_type")
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if model_type in UNSUPPORTED:
        raise GQAConvertError(f"architecture '{model_type}' is not supported: {UNSUPPORTED[model_type]}")
    supported = ", ".join(sorted(ARCHITECTURES))
    raise GQAConvertError(f"architecture '{model_type}' is not supported; supported: {supported}")


# ---- reading and writing the kv head count in a config -------------------------------------------


def _standard_kv(config: Any, arch: Architecture) -> int:
    value = getattr(config, arch.kv_attribute, None)
    return int(value) if value is not None else int(config.num_attention_heads)


def _standard_write(config_dict: dict[str, Any], config: Any, arch: Architecture, kv_heads: int) -> None:
    config_dict[arch.kv_attribute] = kv_heads


def _falcon_kv(config: Any, arch: Architecture) -> int:
    # Mirrors FalconAttention: the old MQA layout has one kv head whatever num_kv_heads says.
    if config.new_decoder_architecture or not config.multi_query:
        return int(config.num_kv_heads)
    return 1


def _falcon_write(config_dict: dict[str, Any], config: Any, arch: Architecture, kv_heads: int) -> None:
    """Pick the fused layout that expresses kv_heads; all three are the grouped layout in memory."""
    heads = int(config.num_attention_heads)
    config_dict["num_kv_heads"] = kv_heads
    if config.new_decoder_architecture:
        return
    if kv_heads in (1, heads):  # old layouts: [Q | K | V] for MQA, (nh, 3, hd) for MHA
        config_dict["multi_query"] = kv_heads == 1
        return
    if not config.parallel_attn:
        raise GQAConvertError(
            "this Falcon uses the old sequential layout, which transformers can only load as MHA or MQA: "
            f"use --kv-heads 1 (or {heads})"
        )
    # The new decoder layout is the only one that can be GQA; one shared input norm keeps the function.
    config_dict.update(new_decoder_architecture=True, num_ln_in_parallel_attn=1, multi_query=False)


KV_CONFIG_RULES = {
    "standard": (_standard_kv, _standard_write),
    "falcon": (_falcon_kv, _falcon_write),
}


def kv_heads_of(config: Any, arch: Architecture) -> int:
    return KV_CONFIG_RULES[arch.kv_config][0](config, arch)


def write_kv_heads(config_dict: dict[str, Any], config: Any, arch: Architecture, kv_heads: int) -> None:
    KV_CONFIG_RULES[arch.kv_config][1](config_dict, config, arch, kv_heads)


def head_dim_of(config: Any) -> int:
    """Gemma and others set head_dim explicitly (nh*hd may differ from hidden); never assume hidden/nh."""
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else int(config.hidden_size) // int(config.num_attention_heads)
