"""Calibration statistics of the source model, one decoder layer in memory at a time.

The model is built with a single decoder layer; its forward runs the embedding (and whatever the
architecture does before its layers: scaling, rotary tables, masks) and the inputs reaching the first
layer are caught. Then each layer is built, loaded from the checkpoint, run over the calibration
hidden states, and dropped; a hook on its attention module accumulates the second moment of the
attention input (after the input norm), with a constant 1 appended so biases are covered too.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from gqa_convert.arch import write_kv_heads
from gqa_convert.data.text import check_data, read_text, tokenize_text
from gqa_convert.errors import GQAConvertError
from gqa_convert.io.sources import Checkpoint

# One call of an attention module: its hidden-states input, its other keyword arguments, its output.
AttentionCall = tuple[torch.Tensor, dict[str, Any], torch.Tensor]
# (hidden states, the other keyword arguments of a decoder layer) for one calibration batch
LayerInput = tuple[torch.Tensor, dict[str, Any]]


@dataclass
class LayerStats:
    """Sum over calibration tokens of [x, 1][x, 1]^T for the attention input x of one layer and,
    when asked for, the attention module's inputs and outputs per batch (for refinement)."""

    second_moment: torch.Tensor  # (d + 1, d + 1), float64
    tokens: int
    attention_calls: list[AttentionCall] | None = None
    make_attention: Callable[[int], Any] | None = None  # kv_heads -> a fresh attention module of this layer


class _Caught(Exception):
    pass


def calibration_ids(
    checkpoint: Checkpoint, data: str, tokens: int, seq_len: int, text_column: str = "text"
) -> torch.Tensor:
    """(n, seq_len) token ids from the first `tokens` tokens of `data`, with the source's tokenizer."""
    check_data(data)
    ids = tokenize_text(checkpoint.tokenizer(), read_text(data, text_column), max_tokens=tokens)
    windows = len(ids) // seq_len
    if windows < 1 or windows * seq_len < min(tokens, 4 * seq_len):
        raise GQAConvertError(
            f"{data} gives {len(ids)} tokens: calibration needs at least {min(tokens, 4 * seq_len)} "
            f"(--calib-tokens {tokens}, --calib-seq-len {seq_len}); give more text"
        )
    return ids[: windows * seq_len].view(windows, seq_len)


def _shell(checkpoint: Checkpoint) -> Any:
    """The model with one decoder layer, its non-layer weights loaded from the checkpoint."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(checkpoint.config)
    config.num_hidden_layers = 1
    if hasattr(config, "layer_types") and config.layer_types:
        config.layer_types = config.layer_types[:1]
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
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


def _first_layer_inputs(model: Any, first: Any, ids: torch.Tensor, batch_size: int) -> list[LayerInput]:
    """Run the shell model until its first layer, per batch, and keep what reaches that layer."""
    caught: list[LayerInput] = []

    def catch(module: Any, args: tuple, kwargs: dict) -> None:
        hidden = args[0] if args else kwargs.pop("hidden_states")
        caught.append((hidden.detach(), {k: v for k, v in kwargs.items() if k != "hidden_states"}))
        raise _Caught

    handle = first.register_forward_pre_hook(catch, with_kwargs=True)
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            try:
                model(input_ids=ids[start : start + batch_size], use_cache=False)
            except _Caught:
                pass
    handle.remove()
    return caught


def _run_layer(
    layer: Any, attention: Any, inputs: list[LayerInput], keep_activations: bool
) -> tuple[LayerStats, list[LayerInput]]:
    """Run one layer over every batch: the attention input's second moment, the recorded attention
    calls (when kept), and the layer's outputs (the next layer's inputs)."""
    width = int(inputs[0][0].shape[-1]) + 1
    moment = torch.zeros(width, width, dtype=torch.float64)
    count = 0
    calls: list[AttentionCall] = []

    def accumulate(module: Any, args: tuple, kwargs: dict) -> None:
        nonlocal moment, count
        x = (args[0] if args else kwargs["hidden_states"]).reshape(-1, width - 1).double()
        x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
        moment += x.T @ x
        count += len(x)

    def record(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        calls.append((hidden.detach(), rest, (output[0] if isinstance(output, tuple) else output).detach()))

    hooks = [attention.register_forward_pre_hook(accumulate, with_kwargs=True)]
    if keep_activations:
        hooks.append(attention.register_forward_hook(record, with_kwargs=True))
    outputs = []
    with torch.no_grad():
        for hidden, kwargs in inputs:
            output = layer(hidden, **kwargs)
            outputs.append((output[0] if isinstance(output, tuple) else output, kwargs))
    for hook in hooks:
        hook.remove()
    return LayerStats(moment, count, calls if keep_activations else None), outputs


def layer_statistics(
    checkpoint: Checkpoint, ids: torch.Tensor, batch_size: int = 4, keep_activations: bool = False
) -> Iterator[tuple[int, LayerStats]]:
    """Yield (layer index, statistics) in layer order, propagating the source model's hidden states."""
    model = _shell(checkpoint)
    first = _layers_module(model, checkpoint)[0]
    inputs = _first_layer_inputs(model, first, ids, batch_size)
    layer_class, implementation = type(first), model.config._attn_implementation
    attention_name = checkpoint.architecture.attention_module
    for index in range(int(checkpoint.config.num_hidden_layers)):
        layer = _load_layer(layer_class, checkpoint, index, implementation)
        stats, inputs = _run_layer(layer, getattr(layer, attention_name), inputs, keep_activations)
        del layer

        def make_attention(kv_heads: int, index: int = index) -> Any:
            config = copy.deepcopy(checkpoint.config)
            config._attn_implementation = implementation
            settings: dict[str, Any] = {}
            write_kv_heads(settings, config, checkpoint.architecture, kv_heads)
            for key, value in settings.items():
                setattr(config, key, value)
            return getattr(layer_class(config, index), attention_name).float()

        stats.make_attention = make_attention
        yield index, stats


def _load_layer(layer_class: type, checkpoint: Checkpoint, index: int, attention: str) -> Any:
    config = copy.deepcopy(checkpoint.config)
    config._attn_implementation = attention  # what the shell model chose: its mask was made for it
    layer = layer_class(config, index).eval().float()
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
