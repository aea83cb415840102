"""A model's shape without its weights: the config (a folder's config.json or a GGUF file's header;
no tensor is read), the model built on the meta device by transformers' own code, and from it every
parameter tensor with the group a strategy shards it in (a decoder layer or the root: embeddings,
final norm, head) and whether `--trainable attention` trains it."""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from gqa_convert.arch import architecture_for, check_head_counts, head_dim_of, kv_heads_of
from gqa_convert.errors import GQAConvertError

ROOT = -1  # the group of the tensors outside the decoder layers
MAX_LAYERS = 1024
# architectures whose decoder layer the activation model follows exactly (RMSNorm, SDPA, gated MLP)
LLAMA_STYLE = frozenset({"llama", "mistral", "qwen2", "qwen3", "olmo2", "granite", "cohere"})


@dataclass(frozen=True)
class Tensor:
    name: str
    numel: int
    rows: int  # size of dim 0: FSDP2 and DeepSpeed split a tensor along it
    group: int  # decoder layer index, or ROOT
    attention: bool  # trained under --trainable attention


@dataclass(frozen=True)
class ModelShape:
    """What the plan needs of a model: its dimensions and its parameter tensors (tied ones once)."""

    model_type: str
    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    mlp_width: int  # elements per token of each MLP intermediate (x experts per token for MoE)
    vocab: int
    tensors: tuple[Tensor, ...]
    embedding: str  # the input embedding's parameter name (autocast does not copy it)
    tied: bool  # the output head is the input embedding

    @property
    def parameters(self) -> int:
        return sum(t.numel for t in self.tensors)

    def trainable(self, trainable: str) -> tuple[Tensor, ...]:
        return self.tensors if trainable == "all" else tuple(t for t in self.tensors if t.attention)

    def group(self, index: int) -> tuple[Tensor, ...]:
        return tuple(t for t in self.tensors if t.group == index)

    @cached_property
    def _layer_sizes(self) -> dict[str, dict[int, int]]:
        """Parameters per decoder layer: all, and those --trainable attention trains."""
        sizes: dict[str, dict[int, int]] = {"all": {}, "attention": {}}
        for t in self.tensors:
            if t.group != ROOT:
                sizes["all"][t.group] = sizes["all"].get(t.group, 0) + t.numel
                sizes["attention"][t.group] = sizes["attention"].get(t.group, 0) + t.numel * t.attention
        return sizes

    @property
    def largest_layer(self) -> int:
        """Parameters of the largest decoder layer (what a sharded strategy gathers at a time)."""
        return self.largest_trainable_layer("all")

    def largest_trainable_layer(self, trainable: str) -> int:
        return max(self._layer_sizes[trainable].values(), default=0)

    def matrices(self, include_embedding: bool) -> int:
        """Elements of the 2-D tensors (what autocast copies to 16 bits for the matmuls)."""
        return sum(
            t.numel for t in self.tensors if t.numel > t.rows and (include_embedding or t.name != self.embedding)
        )

    @property
    def llama_style(self) -> bool:
        return self.model_type in LLAMA_STYLE


def read_config(source: str | Path) -> Any:
    """The transformers config of a model folder (its config.json alone: no weight file is needed)
    or of a .gguf file (its header)."""
    from gqa_convert.io.gguf import gguf_config, is_gguf
    from gqa_convert.io.sources import read_config as read_folder_config

    path = Path(source)
    if is_gguf(path):
        config = gguf_config(path)
        check_head_counts(config, architecture_for(config.to_dict()))
        return config
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if not path.is_dir():
        raise GQAConvertError(f"model not found: {source} (give a model folder with its config.json, or a .gguf file)")
    return read_folder_config(path)[1]


def model_shape(config: Any) -> ModelShape:
    """Build the model on the meta device (no memory, no weights) and list its parameters."""
    import torch
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    arch = architecture_for(config.to_dict())
    if int(config.num_hidden_layers) > MAX_LAYERS:  # each is built, even on the meta device
        raise GQAConvertError(
            f"the config has {config.num_hidden_layers} decoder layers, more than any model this plans "
            f"({MAX_LAYERS}): check num_hidden_layers in config.json"
        )
    config.use_cache = False
    try:
        with init_empty_weights(include_buffers=True):
            model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    except Exception as error:  # transformers raises many types for configs it cannot build
        raise GQAConvertError(f"a {arch.model_type} model cannot be built from this config: {error}") from None
    embedding = model.get_input_embeddings().weight
    head = model.get_output_embeddings()
    names = {id(parameter): name for name, parameter in model.named_parameters()}
    layer = re.compile(re.escape(arch.layer_prefix).replace(r"\{layer\}", r"(\d+)"))
    tensors = []
    for name, parameter in model.named_parameters():  # a tied parameter is listed once
        match = layer.match(name)
        group = int(match.group(1)) if match else ROOT
        attention = match is not None and name[match.end() :].startswith(arch.attention_module + ".")
        rows = parameter.shape[0] if parameter.dim() else 1
        tensors.append(Tensor(name, parameter.numel(), rows, group, attention))
    return ModelShape(
        model_type=arch.model_type,
        layers=int(config.num_hidden_layers),
        hidden=int(config.hidden_size),
        heads=int(config.num_attention_heads),
        kv_heads=kv_heads_of(config, arch),
        head_dim=head_dim_of(config),
        mlp_width=_mlp_width(config),
        vocab=int(config.vocab_size),
        tensors=tuple(tensors),
        embedding=names[id(embedding)],
        tied=head is not None and head.weight is embedding,
    )


def _mlp_width(config: Any) -> int:
    """The intermediate width a token goes through: experts per token x expert width (+ a shared expert)."""
    experts = int(getattr(config, "num_experts_per_tok", 0) or 0)
    if experts:
        width = getattr(config, "moe_intermediate_size", None) or config.intermediate_size
        shared = getattr(config, "shared_expert_intermediate_size", 0) or 0
        return experts * int(width) + int(shared)
    width = getattr(config, "intermediate_size", None) or getattr(config, "ffn_hidden_size", None)
    return int(width) if width else 4 * int(config.hidden_size)
