"""What a model config says about attention: the kv head count (read and written per the row's rule),
head_dim, the rotary part of a head, the KV-cache size, and the sequence lengths it accepts."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from gqa_convert.arch.schema import Architecture
from gqa_convert.errors import GQAConvertError


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


KvReader = Callable[[Any, Architecture], int]
KvWriter = Callable[[dict[str, Any], Any, Architecture, int], None]
KV_CONFIG_RULES: dict[str, tuple[KvReader, KvWriter]] = {
    "standard": (_standard_kv, _standard_write),
    "falcon": (_falcon_kv, _falcon_write),
}


def kv_heads_of(config: Any, arch: Architecture) -> int:
    return KV_CONFIG_RULES[arch.kv_config][0](config, arch)


def write_kv_heads(config_dict: dict[str, Any], config: Any, arch: Architecture, kv_heads: int) -> None:
    """The kv count written by the row's rule, and every field that restates it (none left stale)."""
    KV_CONFIG_RULES[arch.kv_config][1](config_dict, config, arch, kv_heads)
    for name in arch.kv_mirrors:
        config_dict[name] = kv_heads


def check_head_counts(config: Any, arch: Architecture) -> None:
    """The counts every computation here divides by: positive integers, kv heads dividing heads."""
    for name in ("num_attention_heads", "hidden_size", "num_hidden_layers", "head_dim", arch.kv_attribute):
        value = getattr(config, name, None)
        optional = name in ("head_dim", arch.kv_attribute)  # absent: derived from the others
        if not (optional and value is None) and not _is_count(value):
            raise GQAConvertError(f"the config's {name} is {value!r}: it must be a positive integer; fix config.json")
    heads, kv_heads = int(config.num_attention_heads), kv_heads_of(config, arch)
    if heads % kv_heads:
        raise GQAConvertError(
            f"the config has {heads} attention heads and {kv_heads} kv heads, which do not divide them: fix config.json"
        )
    if getattr(config, "head_dim", None) is None and int(config.hidden_size) % heads:
        raise GQAConvertError(
            f"the config's hidden_size {config.hidden_size} is not a multiple of its {heads} heads and it sets no "
            "head_dim: fix config.json"
        )


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def head_dim_of(config: Any) -> int:
    """Gemma and others set head_dim explicitly (nh*hd may differ from hidden); never assume hidden/nh."""
    head_dim = getattr(config, "head_dim", None)
    return int(head_dim) if head_dim else int(config.hidden_size) // int(config.num_attention_heads)


def rotary_dim(config: Any, head_dim: int) -> int:
    """How many dimensions of a head RoPE rotates (partial rotary: phi, stablelm)."""
    rope = getattr(config, "rope_parameters", None) or {}
    factor = rope.get("partial_rotary_factor", getattr(config, "partial_rotary_factor", None)) or 1.0
    return int(head_dim * factor) // 2 * 2


def valid_kv_heads(kv_heads: int) -> list[int]:
    """Targets reachable by merging whole kv heads: the divisors of the current kv count."""
    return [g for g in range(1, kv_heads + 1) if kv_heads % g == 0]


def kv_cache_bytes_per_token(config: Any, kv_heads: int, bytes_per_element: int = 2) -> int:
    """2 (K and V) x kv heads x head_dim x layers x bytes per element."""
    return 2 * kv_heads * head_dim_of(config) * int(config.num_hidden_layers) * bytes_per_element


def check_seq_len(seq_len: int, config: Any, flag: str = "--seq-len") -> None:
    """A window of seq_len tokens must fit the model's positions."""
    if seq_len < 2:
        raise GQAConvertError(f"{flag} must be at least 2")
    positions = getattr(config, "max_position_embeddings", None)
    if positions is not None and seq_len > positions:
        raise GQAConvertError(
            f"{flag} {seq_len} is above the model's {positions} positions: lower it ({flag} {positions} or less)"
        )
