"""Supported attention layouts, described as data: one row per architecture.

Each row says where a layer's tensors live and which of them depend on the kv head count, in which
layout. One general mechanism (gqa_convert.surgery.layouts) handles every layout; adding an
architecture is adding a row. Facts checked against transformers' modeling files (tests/test_architectures.py).
"""

from __future__ import annotations

from typing import Any

from gqa_convert.arch.schema import Architecture, KvTensor, Layout, QueryTensor, TensorKind
from gqa_convert.errors import GQAConvertError


def _separate(o_proj: str = "o_proj", extra: tuple[KvTensor, ...] = ()) -> dict[str, Any]:
    """Row fields for separate q/k/v/o projections, biases optional."""
    kv = tuple(
        KvTensor(f"self_attn.{proj}_proj.{param}", Layout.ROWS, TensorKind(param))
        for proj in ("k", "v")
        for param in ("weight", "bias")
    )
    query = (
        QueryTensor("self_attn.q_proj.weight", 0),
        QueryTensor("self_attn.q_proj.bias", 0),
        QueryTensor(f"self_attn.{o_proj}.weight", 1),
    )
    projections = {
        "q": "self_attn.q_proj",
        "k": "self_attn.k_proj",
        "v": "self_attn.v_proj",
        "o": f"self_attn.{o_proj}",
    }
    return {
        "layer_prefix": "model.layers.{layer}.",
        "kv_tensors": kv + extra,
        "query_tensors": query,
        "projections": projections,
    }


_PLAIN = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "granite")
_PLAIN += ("starcoder2", "mixtral", "qwen2_moe", "olmo")

# olmo2: RMSNorm over the whole K width (nkv*hd); cohere: LayerNorm of shape (nkv, hd).
_WHOLE_K_NORM = (KvTensor("self_attn.k_norm.weight", Layout.ROWS, TensorKind.NORM),)
_STABLELM_K_NORMS = (
    KvTensor("self_attn.k_layernorm.norms.{head}.weight", Layout.PER_HEAD, TensorKind.NORM),
    KvTensor("self_attn.k_layernorm.norms.{head}.bias", Layout.PER_HEAD, TensorKind.NORM_BIAS),
)

ARCHITECTURES: dict[str, Architecture] = {name: Architecture(name, **_separate()) for name in _PLAIN}
ARCHITECTURES.update(
    {
        "phi": Architecture("phi", **_separate(o_proj="dense")),
        "olmo2": Architecture("olmo2", **_separate(extra=_WHOLE_K_NORM)),
        "cohere": Architecture("cohere", rotary_interleaved=True, **_separate(extra=_WHOLE_K_NORM)),
        "stablelm": Architecture("stablelm", **_separate(extra=_STABLELM_K_NORMS)),
        "phi3": Architecture(
            "phi3",
            layer_prefix="model.layers.{layer}.",
            kv_tensors=(
                KvTensor("self_attn.qkv_proj.weight", Layout.FUSED_CONCAT, TensorKind.WEIGHT),
                KvTensor("self_attn.qkv_proj.bias", Layout.FUSED_CONCAT, TensorKind.BIAS),
            ),
            query_tensors=(QueryTensor("self_attn.o_proj.weight", 1),),
        ),
        "falcon": Architecture(
            "falcon",
            layer_prefix="transformer.h.{layer}.",
            kv_tensors=(
                KvTensor("self_attention.query_key_value.weight", Layout.FUSED_GROUPED, TensorKind.WEIGHT),
                KvTensor("self_attention.query_key_value.bias", Layout.FUSED_GROUPED, TensorKind.BIAS),
            ),
            query_tensors=(QueryTensor("self_attention.dense.weight", 1),),
            kv_config="falcon",
            kv_attribute="num_kv_heads",
            kv_mirrors=("num_key_value_heads",),
        ),
    }
)

_NO_KV_COUNT = "its attention class in transformers has no kv head count, so it cannot load a GQA checkpoint"
_LATENT = "it uses multi-head latent attention (MLA), which already compresses the KV cache"
UNSUPPORTED: dict[str, str] = {
    **dict.fromkeys(("gpt2", "gpt_neox", "opt", "gptj", "bloom", "mpt"), _NO_KV_COUNT),
    "deepseek_v2": _LATENT,
    "deepseek_v3": _LATENT,
    "gpt_bigcode": "transformers supports it only as MHA or MQA (multi_query), not yet handled here",
}


def architecture_for(config_dict: dict[str, Any]) -> Architecture:
    """The row for a checkpoint's config.json, or a clear error naming what is supported."""
    model_type = config_dict.get("model_type")
    supported = ", ".join(sorted(ARCHITECTURES))
    if not model_type:
        raise GQAConvertError(
            f'the config has no model_type: add the architecture, e.g. "model_type": "llama" (supported: {supported})'
        )
    if not isinstance(model_type, str):
        raise GQAConvertError(f"the config's model_type is {model_type!r}, not a name: fix config.json")
    if model_type in ARCHITECTURES:
        return ARCHITECTURES[model_type]
    if model_type in UNSUPPORTED:
        raise GQAConvertError(f"architecture '{model_type}' is not supported: {UNSUPPORTED[model_type]}")
    raise GQAConvertError(f"architecture '{model_type}' is not supported; supported: {supported}")
