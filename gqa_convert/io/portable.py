"""Output folders every client reads the same way: a config.json that transformers 4.57 and 5 (and
llama.cpp's converter, and vLLM) resolve to the same model, and a tokenizer config both load.

transformers 5 writes rope settings only inside `rope_parameters`; 4.57 ignores that key and falls back
to its defaults (a wrong rope theta: different logits, no warning). So rope is written both ways,
consistent with each other. A GGUF-derived config comes from `to_dict()` and carries `architectures:
null` and base-class keys at their defaults; those are replaced or dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gqa_convert.errors import GQAConvertError

# Keys every PretrainedConfig.to_dict() carries; at these values they say nothing about the model.
_BASE_DEFAULTS: dict[str, Any] = {
    "output_hidden_states": False,
    "output_attentions": False,
    "return_dict": True,
    "chunk_size_feed_forward": 0,
    "is_encoder_decoder": False,
    "problem_type": None,
    "dtype": None,
    "torch_dtype": None,
    "id2label": {"0": "LABEL_0", "1": "LABEL_1"},
    "label2id": {"LABEL_0": 0, "LABEL_1": 1},
}
# tokenizer_config.json keys transformers 5 writes that mean nothing to a reader (4.57 included)
_TOKENIZER_NOISE = ("backend", "is_local", "local_files_only")
# transformers 5's generic fast tokenizer; 4.57 knows the same class as PreTrainedTokenizerFast
_GENERIC_FAST = {"TokenizersBackend": "PreTrainedTokenizerFast"}


def causal_lm_architecture(model_type: str) -> str:
    """The class AutoModelForCausalLM builds for `model_type` (a name table: no model code is imported)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    try:
        return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type]
    except KeyError:
        raise GQAConvertError(
            f"transformers has no causal-LM class for model_type '{model_type}': upgrade transformers"
        ) from None


def portable_config(config_dict: dict[str, Any]) -> dict[str, Any]:
    """config.json with real `architectures`, no dummy keys, and rope written both ways."""
    config = {key: value for key, value in config_dict.items() if not key.startswith("_")}
    for key, default in _BASE_DEFAULTS.items():
        if key in config and _normalised(config[key]) == _normalised(default):
            del config[key]
    if not config.get("architectures"):
        config["architectures"] = [causal_lm_architecture(config["model_type"])]
    rope = config.get("rope_parameters")
    if isinstance(rope, dict):
        config.update(_legacy_rope(rope, config))
    return config


def _normalised(value: Any) -> Any:
    """id2label has int or str keys depending on where it came from."""
    if isinstance(value, dict):
        return {str(key): item for key, item in value.items()}
    return value


def _legacy_rope(rope: dict[str, Any], config: dict[str, Any]) -> dict[str, Any]:
    """The transformers 4.x spelling of `rope_parameters`. A dict per layer type (gemma3) maps
    full_attention to rope_theta/rope_scaling and sliding_attention to rope_local_base_freq."""
    if "full_attention" in rope or "sliding_attention" in rope:
        legacy = _legacy_rope(rope.get("full_attention") or {}, config)
        local = (rope.get("sliding_attention") or {}).get("rope_theta")
        if local is not None:
            legacy["rope_local_base_freq"] = local
        return legacy
    legacy: dict[str, Any] = {}
    if "rope_theta" in rope:
        legacy["rope_theta"] = rope["rope_theta"]
    if "partial_rotary_factor" in rope:
        legacy["partial_rotary_factor"] = rope["partial_rotary_factor"]
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":  # transformers 5 takes a non-null rope_scaling over rope_parameters: complete it
        scaling = {k: v for k, v in rope.items() if k not in ("rope_theta", "partial_rotary_factor", "type")}
        legacy["rope_scaling"] = {**scaling, "rope_type": rope_type}
    elif config.get("rope_scaling") is not None:
        legacy["rope_scaling"] = None
    return legacy


def make_tokenizer_portable(folder: Path) -> None:
    """Rewrite a tokenizer_config.json written by transformers 5 (or copied from such a source) so
    that transformers 4.57 loads it too. tokenizer.json stays as it is: both build the fast tokenizer
    from it. (A model-specific class would not do: 4.57's LlamaTokenizerFast adds a BOS token.)"""
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return
    try:
        config = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise GQAConvertError(f"{path} is not valid JSON: fix the source's tokenizer_config.json") from None
    if config.get("tokenizer_class") in _GENERIC_FAST:
        if not (folder / "tokenizer.json").is_file():
            raise GQAConvertError(f"{folder} has a {config['tokenizer_class']} tokenizer but no tokenizer.json")
        config["tokenizer_class"] = _GENERIC_FAST[config["tokenizer_class"]]
    for key in _TOKENIZER_NOISE:
        config.pop(key, None)
    path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n")
