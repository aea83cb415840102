"""Calibration statistics of the source model, one decoder layer in memory at a time.

The model is built with a single decoder layer; its forward runs the embedding (and whatever the
architecture does before its layers: scaling, rotary tables, masks) and the inputs reaching the first
layer are caught. Then each layer is built, loaded from the checkpoint, run over the calibration
hidden states, and dropped; a hook on its attention module accumulates the second moment of the
attention input (after the input norm), with a constant 1 appended so biases are covered too.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Iterator

import torch

from gqa_convert.checkpoint import Checkpoint
from gqa_convert.errors import GQAConvertError


@dataclass
class LayerStats:
    """Sum over calibration tokens of [x, 1][x, 1]^T for the attention input x of one layer and,
    when asked for, the attention module's inputs and outputs per batch (for refinement)."""

    second_moment: torch.Tensor  # (d + 1, d + 1), float64
    tokens: int
    attention_calls: list[tuple[torch.Tensor, dict[str, Any], torch.Tensor]] | None = None
    make_attention: Any = None  # kv_heads -> a fresh attention module of this layer (random weights)


class _Caught(Exception):
    pass


def calibration_ids(checkpoint: Checkpoint, data: str, tokens: int, seq_len: int, text_column: str = "text") -> torch.Tensor:
    """(n, seq_len) token ids from the first `tokens` tokens of `data`, with the source's tokenizer."""
    from gqa_convert.data import check_data, read_text
    from gqa_convert.evaluate import tokenize_text

    check_data(data)
    tokenizer = load_tokenizer(checkpoint)
    ids = tokenize_text(tokenizer, read_text(data, text_column), max_tokens=tokens)
    windows = len(ids) // seq_len
    if windows < 1 or windows * seq_len < min(tokens, 4 * seq_len):
        raise GQAConvertError(
            f"{data} gives {len(ids)} tokens: calibration needs at least {min(tokens, 4 * seq_len)} "
            f"(--calib-tokens {tokens}, --calib-seq-len {seq_len}); give more text"
        )
    return ids[: windows * seq_len].view(windows, seq_len)


def load_tokenizer(checkpoint: Checkpoint) -> Any:
    from pathlib import Path

    from transformers import AutoTokenizer

    if checkpoint.gguf_file is not None:
        gguf = Path(checkpoint.gguf_file)
        return AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    try:
        return AutoTokenizer.from_pretrained(checkpoint.folder)
    except (OSError, ValueError) as error:
        raise GQAConvertError(f"calibration needs the source's tokenizer, which could not be loaded: {error}") from None


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
    path = checkpoint.architecture.layer_prefix.split(".{layer}")[0]
    module = model
    for part in path.split("."):
        module = getattr(module, part)
    return module


def layer_statistics(checkpoint: Checkpoint, ids: torch.Tensor, batch_size: int = 4,
                     keep_activations: bool = False) -> Iterator[tuple[int, LayerStats]]:  # fmt: skip
    """Yield (layer index, statistics) in layer order, propagating the source model's hidden states."""
    model = _shell(checkpoint)
    layers = _layers_module(model, checkpoint)
    first = layers[0]
    caught: list[tuple[torch.Tensor, dict[str, Any]]] = []

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
    layer_class = type(first)
    attention_name = checkpoint.architecture.kv_tensors[0].suffix.split(".")[0]
    for index in range(int(checkpoint.config.num_hidden_layers)):
        layer = _load_layer(layer_class, checkpoint, index, model.config._attn_implementation)
        width = _hidden_size(caught) + 1
        moment = torch.zeros(width, width, dtype=torch.float64)
        count = 0

        def accumulate(module: Any, args: tuple, kwargs: dict) -> None:
            nonlocal moment, count
            x = (args[0] if args else kwargs["hidden_states"]).reshape(-1, moment.shape[0] - 1).double()
            x = torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1)
            moment += x.T @ x
            count += len(x)

        calls: list[tuple[torch.Tensor, dict[str, Any], torch.Tensor]] = []

        def record(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
            hidden = args[0] if args else kwargs["hidden_states"]
            rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
            calls.append((hidden.detach(), rest, (output[0] if isinstance(output, tuple) else output).detach()))

        attention = getattr(layer, attention_name)
        hooks = [attention.register_forward_pre_hook(accumulate, with_kwargs=True)]
        if keep_activations:
            hooks.append(attention.register_forward_hook(record, with_kwargs=True))
        with torch.no_grad():
            for position, (hidden, kwargs) in enumerate(caught):
                output = layer(hidden, **kwargs)
                caught[position] = (output[0] if isinstance(output, tuple) else output, kwargs)
        for hook in hooks:
            hook.remove()
        del layer

        def make_attention(kv_heads: int, index: int = index) -> Any:
            config = copy.deepcopy(checkpoint.config)
            config._attn_implementation = model.config._attn_implementation
            from gqa_convert.architectures import write_kv_heads

            settings = {}
            write_kv_heads(settings, config, checkpoint.architecture, kv_heads)
            for key, value in settings.items():
                setattr(config, key, value)
            return getattr(layer_class(config, index), attention_name).float()

        yield index, LayerStats(moment, count, calls if keep_activations else None, make_attention)


def _hidden_size(caught: list[tuple[torch.Tensor, dict[str, Any]]]) -> int:
    return int(caught[0][0].shape[-1])


def _load_layer(layer_class: type, checkpoint: Checkpoint, index: int, attention: str) -> Any:
    config = copy.deepcopy(checkpoint.config)
    config._attn_implementation = attention  # what the shell model chose: its mask was made for it
    layer = layer_class(config, index).eval().float()
    prefix = checkpoint.architecture.layer_prefix.format(layer=index)
    state = {name[len(prefix) :]: checkpoint.get(name).float() for name in checkpoint.tensors if name.startswith(prefix)}
    missing, unexpected = layer.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise GQAConvertError(f"layer {index}: checkpoint tensors do not match the model class "
                              f"(missing {missing[:3]}, unexpected {unexpected[:3]})")  # fmt: skip
    return layer
