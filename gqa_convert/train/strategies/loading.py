"""Models loaded straight into their training layout, and the optimizer over what trains: every process
builds the model with its parameters on the meta device, applies its layout (freezing, checkpointing,
sharding), allocates its own part on its device, and rank 0 alone reads the weights (in the
checkpoint's dtype), which are broadcast tensor by tensor into every process's part. No other process
ever holds the checkpoint in memory."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from gqa_convert.arch import architecture_for
from gqa_convert.io.gguf import is_gguf
from gqa_convert.io.sources import declared_dtype, load_causal_lm, model_config


def source_dtype(source: str | Path) -> torch.dtype:
    """The dtype the weights are stored in (a GGUF is dequantized to float32)."""
    return torch.float32 if is_gguf(Path(source)) else declared_dtype(Path(source))


def empty_causal_lm(source: str | Path, dtype: torch.dtype) -> Any:
    """The model of `source` with parameters on the meta device; buffers (rotary frequencies, embedding
    scales) are real, computed by the model's own code."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    config = model_config(source)
    config.use_cache = False
    with init_empty_weights(include_buffers=False):
        try:  # torch's scaled_dot_product_attention, named rather than left to transformers' default
            return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
        except ValueError:  # an architecture without an SDPA path: its own attention
            return AutoModelForCausalLM.from_config(config, dtype=dtype)


def load_into(
    source: str | Path,
    root: nn.Module,
    device: torch.device,
    layout: Callable[[nn.Module], None] | None = None,
) -> nn.Module:
    """`root` wraps an empty_causal_lm as `root.causal_lm`: apply `layout` (on meta), allocate on
    `device`, restore the buffers, then fill the parameters from rank 0's read of `source`."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    if layout is not None:
        layout(root)
    buffers = {name: buffer.clone() for name, buffer in root.named_buffers()}
    root.to_empty(device=device)  # garbage everywhere, and unties tied weights that are not sharded
    with torch.no_grad():
        for name, buffer in root.named_buffers():
            buffer.copy_(buffers[name])
    if getattr(root.causal_lm.config, "tie_word_embeddings", False):
        root.causal_lm.tie_weights()
    full: dict[str, torch.Tensor] = {}
    if dist.get_rank() == 0:
        source_model = load_causal_lm(source, dtype=source_dtype(source))
        full = {f"causal_lm.{name}": tensor for name, tensor in source_model.state_dict().items()}
    set_model_state_dict(root, full, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))
    del full
    return root


def decoder_layers(causal_lm: Any) -> list[nn.Module]:
    """The decoder layers, from the architecture table (model.layers, transformer.h)."""
    arch = architecture_for(causal_lm.config.to_dict())
    return list(causal_lm.get_submodule(arch.layers_path))


def compile_blocks(causal_lm: Any) -> None:
    """Regional compilation: each decoder block's forward through torch.compile. The blocks share one
    compiled graph (same code, parameters as inputs), so compiling costs one block's time, not the
    model's; the modules stay as they are (parameter names, checkpoints), and the hooks around a block
    (sharding, gradient checkpointing) run eagerly around its compiled forward."""
    for layer in decoder_layers(causal_lm):
        layer.forward = torch.compile(layer.forward)


def freeze_all_but_attention(causal_lm: Any) -> None:
    """--trainable attention: only each layer's attention module (q/k/v/o and their norms) trains."""
    arch = architecture_for(causal_lm.config.to_dict())
    prefixes = [
        arch.layer_prefix.format(layer=i) + arch.attention_module + "."
        for i in range(causal_lm.config.num_hidden_layers)
    ]
    for name, parameter in causal_lm.named_parameters():
        parameter.requires_grad = any(name.startswith(prefix) for prefix in prefixes)


def build_optimizer(model: nn.Module, weight_decay: float, lr: float, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters; no decay on biases and norms (the groups are tagged, so a
    resumed optimizer takes the run's weight decay, see set_hyperparameters)."""
    decay, no_decay = [], []
    for parameter in model.parameters():
        if parameter.requires_grad:
            (decay if parameter.dim() >= 2 else no_decay).append(parameter)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "decay": True},
        {"params": no_decay, "weight_decay": 0.0, "decay": False},
    ]
    # fused: one kernel for all parameters (what the HF Trainer uses), not with sharded (DTensor) parameters;
    # else foreach (multi-tensor ops), which torch picks by itself on GPUs only (on CPU: a loop per tensor)
    if fused:
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=True)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8, foreach=True)


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, weight_decay: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
        if "decay" in group:
            group["weight_decay"] = weight_decay if group["decay"] else 0.0
