"""The two root modules a strategy wraps: the student, whose forward ends in the chunked losses, and the
frozen teacher, whose forward returns its final hidden states (its head is applied chunk by chunk inside
the student's loss).

Why wrappers: under fully_shard, the parameters of the root group (embeddings, final norm, output head)
are plain full tensors only between the root's pre-forward and its post-backward. Computing the loss
inside the root forward keeps every use of the head's weight inside that window, with no extra
all-gather per chunk.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput

from gqa_convert.train.losses import DEFAULT_CHUNK_BYTES, Head, LossParts, Weights, head_losses, positions_per_chunk


def head_of(causal_lm: Any) -> Head:
    """The output head as the architecture's forward applies it: a bias (phi), a logit scale (cohere's
    logit_scale, granite's 1 / logits_scaling) and a final soft cap (gemma2, gemma3)."""
    config = causal_lm.config
    lm_head = causal_lm.get_output_embeddings()
    scale = 1.0
    if getattr(config, "logit_scale", None) is not None:
        scale = float(config.logit_scale)
    if getattr(config, "logits_scaling", None) is not None:
        scale = 1.0 / float(config.logits_scaling)
    softcap = getattr(config, "final_logit_softcapping", None)
    bias = getattr(lm_head, "bias", None)
    return Head(_unsharded(lm_head.weight), None if bias is None else _unsharded(bias), scale, softcap)


class CausalLMWithChunkedLoss(nn.Module):
    """A transformers *ForCausalLM whose forward returns LossParts (labels given) or logits."""

    def __init__(self, causal_lm: Any, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        super().__init__()
        if getattr(causal_lm.config, "output_router_logits", False):
            warnings.warn("the router's load-balancing loss is not added during uptraining", stacklevel=2)
        self.causal_lm = causal_lm
        self.chunk = positions_per_chunk(causal_lm.config.vocab_size, chunk_bytes)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        teacher_hidden: torch.Tensor | None = None,
        teacher_head: Head | None = None,
        weights: Weights | None = None,
    ) -> LossParts | CausalLMOutput:
        hidden = self.causal_lm.base_model(input_ids=input_ids).last_hidden_state
        head = head_of(self.causal_lm)
        if labels is None:  # full logits: for checks and small evaluations only
            return CausalLMOutput(logits=head.logits(hidden)[0])
        size = hidden.shape[-1]
        predicted = hidden[:, :-1].reshape(-1, size)
        teacher = None
        if teacher_hidden is not None:
            teacher = teacher_hidden[:, :-1].reshape(-1, teacher_hidden.shape[-1])
        return head_losses(predicted, head, labels[:, 1:].reshape(-1), teacher, teacher_head, weights, self.chunk)


class FrozenTeacher(nn.Module):
    """Returns the final hidden states; its head (head_of(teacher.causal_lm)) is read by the caller
    while the strategy keeps it gathered."""

    def __init__(self, causal_lm: Any) -> None:
        super().__init__()
        causal_lm.eval().requires_grad_(False)
        self.causal_lm = causal_lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.causal_lm.base_model(input_ids=input_ids).last_hidden_state


def _unsharded(tensor: torch.Tensor) -> torch.Tensor:
    """Inside a root forward FSDP2 has swapped in the gathered tensor; a DTensor here means the root
    resharded (or the module is not the root): fail rather than compute on a shard."""
    from torch.distributed.tensor import DTensor

    if isinstance(tensor, DTensor):
        raise RuntimeError("the output head is still sharded inside the root forward: shard the wrapper as the root")
    return tensor
