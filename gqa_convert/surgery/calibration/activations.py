"""Calibration inputs of the source model, one decoder layer in memory at a time.

The model is built with a single decoder layer and eager attention (so every mask is explicit and the
attention modules return their probabilities); its forward runs the embedding (and whatever the
architecture does before its layers: scaling, rotary tables, masks) and the inputs reaching the first
layer are caught, once per layer type (full or sliding attention have different masks). Layers are
then built on the calibration device and loaded from the checkpoint one at a time.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch

from gqa_convert.arch import write_kv_heads
from gqa_convert.data.text import check_data, read_text, tokenize_text
from gqa_convert.errors import GQAConvertError
from gqa_convert.io.sources import Checkpoint
from gqa_convert.surgery.calibration.settings import Calibration

ATTENTION = "eager"  # explicit masks, and attention probabilities returned by every attention module


@dataclass
class Batch:
    """One calibration batch entering a decoder layer: the residual stream and the layer's other
    keyword arguments (mask, rotary tables...)."""

    hidden: torch.Tensor
    kwargs: dict[str, Any]


class _Caught(Exception):
    pass


def _windows(checkpoint: Checkpoint, data: str, tokens: int, seq_len: int, text_column: str) -> torch.Tensor:
    check_data(data)
    ids = tokenize_text(checkpoint.tokenizer(check_vocab=True), read_text(data, text_column), max_tokens=tokens)
    windows = len(ids) // seq_len
    if windows < 1 or windows * seq_len < min(tokens, 4 * seq_len):
        raise GQAConvertError(
            f"{data} gives {len(ids)} tokens: calibration needs at least {min(tokens, 4 * seq_len)} "
            f"(--calib-tokens {tokens}, --calib-seq-len {seq_len}); give more text"
        )
    return ids[: windows * seq_len].view(windows, seq_len)


def calibration_ids(checkpoint: Checkpoint, calibration: Calibration) -> torch.Tensor:
    """(n, seq_len) token ids: the first tokens of each calibration text (an equal share each), their
    windows interleaved so that every batch, and the held-out batches, mix the texts."""
    share = calibration.tokens // len(calibration.sources)
    if share < calibration.seq_len:  # the settings, not the text, leave no whole window
        each = f" ({share} for each of {len(calibration.sources)} texts)" if len(calibration.sources) > 1 else ""
        raise GQAConvertError(
            f"--calib-tokens {calibration.tokens}{each} is less than one window of --calib-seq-len "
            f"{calibration.seq_len}: raise --calib-tokens or lower --calib-seq-len"
        )
    parts = [
        _windows(checkpoint, data, share, calibration.seq_len, calibration.text_column) for data in calibration.sources
    ]
    order = sorted(
        ((position, source) for source, part in enumerate(parts) for position in range(len(part))),
    )
    return torch.stack([parts[source][position] for position, source in order])


def layer_config(checkpoint: Checkpoint, kv_heads: int | None = None) -> Any:
    """The source config with eager attention (and another kv count, when given)."""
    config = copy.deepcopy(checkpoint.config)
    config._attn_implementation = ATTENTION
    if kv_heads is not None:
        settings: dict[str, Any] = {}
        write_kv_heads(settings, config, checkpoint.architecture, kv_heads)
        for key, value in settings.items():
            setattr(config, key, value)
    return config


def _shell(checkpoint: Checkpoint, device: str) -> Any:
    """The model with one decoder layer, its non-layer weights loaded from the checkpoint."""
    from transformers import AutoModelForCausalLM

    config = layer_config(checkpoint)
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1]
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation=ATTENTION).eval()
    layer_prefix = checkpoint.architecture.layer_prefix.split("{layer}")[0]
    own = dict(model.named_parameters())
    for name in checkpoint.tensors:
        if not name.startswith(layer_prefix) and name in own:
            own[name].data.copy_(checkpoint.get(name).float())
    return model


def _layers_module(model: Any, checkpoint: Checkpoint) -> torch.nn.ModuleList:
    module = model
    for part in checkpoint.architecture.layers_path.split("."):
        module = getattr(module, part)
    return module


def layer_types(checkpoint: Checkpoint) -> list[str | None]:
    """Each layer's attention type (full, sliding...), None where the config has no such list."""
    types = getattr(checkpoint.config, "layer_types", None)
    count = int(checkpoint.config.num_hidden_layers)
    return list(types)[:count] if types else [None] * count


def first_layer_inputs(
    checkpoint: Checkpoint, ids: torch.Tensor, device: str, batch_size: int
) -> tuple[list[torch.Tensor], dict[str | None, list[dict[str, Any]]]]:
    """The hidden states reaching the first layer (per batch) and, per layer type, the keyword
    arguments every layer of that type gets (per batch)."""
    model = _shell(checkpoint, device)
    first = _layers_module(model, checkpoint)[0]
    hidden: list[torch.Tensor] = []
    kwargs_by_type: dict[str | None, list[dict[str, Any]]] = {}
    for layer_type in dict.fromkeys(layer_types(checkpoint)):
        if layer_type is not None:
            model.config.layer_types[0] = layer_type  # read by the model's forward to pick the mask
        caught: list[tuple[torch.Tensor, dict[str, Any]]] = []

        def catch(module: Any, args: tuple, kwargs: dict, caught: list = caught) -> None:
            state = args[0] if args else kwargs.pop("hidden_states")
            caught.append((state.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
            raise _Caught

        handle = first.register_forward_pre_hook(catch, with_kwargs=True)
        with torch.no_grad():
            for start in range(0, len(ids), batch_size):
                try:
                    model(input_ids=ids[start : start + batch_size].to(device), use_cache=False)
                except _Caught:
                    pass
        handle.remove()
        hidden = [state for state, _ in caught]
        kwargs_by_type[layer_type] = [kwargs for _, kwargs in caught]
    del model
    return hidden, kwargs_by_type


def load_layer(checkpoint: Checkpoint, index: int, device: str, template: Any) -> Any:
    """Decoder layer `index` of the source, float32 on `device` (template: any layer of the model
    class, for its type)."""
    with torch.device(device):
        layer = type(template)(layer_config(checkpoint), index).eval().float()
    prefix = checkpoint.architecture.layer_prefix.format(layer=index)
    state = {
        name[len(prefix) :]: checkpoint.get(name).float() for name in checkpoint.tensors if name.startswith(prefix)
    }
    missing, unexpected = layer.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise GQAConvertError(
            f"layer {index}: checkpoint tensors do not match the model class "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    return layer


def layer_template(checkpoint: Checkpoint) -> Any:
    """One decoder layer on the meta device: its class builds the real ones."""
    from transformers import AutoModelForCausalLM

    config = layer_config(checkpoint)
    config.num_hidden_layers = 1
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:1]
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=ATTENTION)
    return _layers_module(model, checkpoint)[0]
