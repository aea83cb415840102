"""LM cross-entropy and T^2 KL(teacher || student) from final hidden states, a chunk of positions at a
time: [positions, vocab] logits exist for one chunk only, in forward and in backward.

A custom autograd function computes each chunk's loss and its gradients with respect to the hidden
states and the output head (weight, bias) during the forward pass (the fused linear cross-entropy
trick), so backward keeps only grad_hidden [N, H] and grad_weight [V, H], and neither the teacher's nor
the student's head weight is needed after forward (a sharded root may reshard at once). Definitions
are those of the unchunked losses:

    lm = mean over labelled positions of -log softmax(logits)[label]          (labels == -100 skipped)
    kd = T^2 / N * sum_i KL(softmax(t_i / T) || softmax(s_i / T))             (all N predicted positions)
    loss = lm_weight * lm + kd_weight * kd

with logits = softcap(scale * (h W^T + b)) as each architecture's head computes them.

The two root modules every strategy wraps use them: the student (CausalLMWithChunkedLoss), whose
forward ends in these losses, and the frozen teacher (FrozenTeacher), whose forward returns its final
hidden states. Why wrappers: under fully_shard, the parameters of the root group (embeddings, final
norm, output head) are plain full tensors only between the root's pre-forward and its post-backward;
computing the loss inside the root forward keeps every use of the head's weight inside that window,
with no extra all-gather per chunk.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from transformers.modeling_outputs import CausalLMOutput
from transformers.utils import ModelOutput

IGNORE_INDEX = -100
DEFAULT_CHUNK_BYTES = 256 << 20  # one fp32 [positions, vocab] chunk: 523 positions at vocab 128k


@dataclass
class Head:
    """An output head: logits = softcap(scale * (hidden @ weight.T + bias)), softcap(z) = c tanh(z / c)."""

    weight: torch.Tensor  # [vocab, hidden]
    bias: torch.Tensor | None = None
    scale: float = 1.0
    softcap: float | None = None

    def logits(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """fp32 logits of a chunk, and tanh(z / c) when soft-capped (its gradient needs it)."""
        logits = hidden @ self.weight.t()
        if self.bias is not None:
            logits = logits + self.bias
        logits = logits.float()
        if self.scale != 1.0:
            logits.mul_(self.scale)
        if self.softcap is None:
            return logits, None
        tanh = torch.tanh(logits.div_(self.softcap))
        return tanh * self.softcap, tanh

    def backprop(self, grad: torch.Tensor, tanh: torch.Tensor | None) -> torch.Tensor:
        """d loss / d (hidden @ weight.T + bias) from d loss / d logits (in place)."""
        if tanh is not None:
            grad.mul_(1 - tanh * tanh)
        if self.scale != 1.0:
            grad.mul_(self.scale)
        return grad


@dataclass
class LossParts(ModelOutput):
    """A model output (a dict as well), so that every wrapper (DDP, FSDP2, a DeepSpeed engine) finds the
    differentiable loss in it."""

    loss: torch.Tensor | None = None  # differentiable: what backward is called on
    lm: torch.Tensor | None = None  # detached LM cross-entropy (comparable with or without a teacher)
    kd: torch.Tensor | None = None  # detached T^2 KL, zero without a teacher


def positions_per_chunk(vocab_size: int, chunk_bytes: int) -> int:
    """How many positions fit one fp32 [positions, vocab] tensor of chunk_bytes."""
    return max(1, chunk_bytes // (4 * vocab_size))


@dataclass
class Weights:
    lm: float = 1.0
    kd: float = 0.0
    temperature: float = 1.0


def head_losses(
    hidden: torch.Tensor,
    head: Head,
    labels: torch.Tensor,
    teacher_hidden: torch.Tensor | None = None,
    teacher_head: Head | None = None,
    weights: Weights | None = None,
    chunk: int = 1024,
) -> LossParts:
    """hidden [N, H] and labels [N] are the predicted positions already shifted (position i predicts
    labels[i]); teacher_hidden [N, Ht] with teacher_head enable distillation."""
    if (teacher_hidden is None) != (teacher_head is None):
        raise ValueError("teacher_hidden and teacher_head go together")
    weights = weights or Weights()
    if teacher_hidden is None:
        weights = Weights(weights.lm, 0.0, weights.temperature)
    if not torch.is_grad_enabled():  # evaluation: skip the gradient matmuls done in forward
        hidden = hidden.detach()
        head = replace(head, weight=head.weight.detach(), bias=None if head.bias is None else head.bias.detach())
    loss, lm, kd = _ChunkedHeadLoss.apply(
        hidden, head.weight, head.bias, labels, head, teacher_hidden, teacher_head, weights, chunk
    )
    return LossParts(loss, lm, kd)


class _ChunkedHeadLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, head, teacher_hidden, teacher_head, weights, chunk):  # type: ignore[override]
        count = hidden.shape[0]
        valid = labels != IGNORE_INDEX
        labelled = valid.sum().clamp(min=1).to(torch.float32)
        lm_scale = weights.lm / labelled  # d loss / d (CE summed over positions)
        kd_scale = weights.kd * weights.temperature / count  # d (w T^2/N KL) / d student logits = w T/N (p_s - p_t)
        grads = _Grads(hidden, weight, bias, ctx.needs_input_grad[:3])
        lm_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        kd_sum = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for start in range(0, count, chunk):
            end = min(start + chunk, count)
            h, target, ok = hidden[start:end], labels[start:end].clamp(min=0), valid[start:end]
            logits, tanh = head.logits(h)
            log_norm = torch.logsumexp(logits, dim=-1)
            lm_sum += ((log_norm - logits.gather(1, target[:, None]).squeeze(1)) * ok).sum()
            grad = logits.sub(log_norm[:, None]).exp_()  # softmax
            grad.scatter_add_(1, target[:, None], torch.full_like(log_norm[:, None], -1.0))  # - one-hot
            grad.mul_((lm_scale * ok)[:, None])
            if teacher_hidden is not None:
                kd_sum += _add_kd_gradient(grad, logits, teacher_head, teacher_hidden[start:end], weights, kd_scale)
            del logits
            grads.add(head.backprop(grad, tanh), h, start, end)
            del grad, tanh
        lm = lm_sum / labelled
        kd = kd_sum * weights.temperature**2 / count
        loss = weights.lm * lm + weights.kd * kd
        ctx.save_for_backward(*grads.result())
        ctx.mark_non_differentiable(lm, kd)
        return loss, lm, kd

    @staticmethod
    def backward(ctx, grad_loss, _grad_lm, _grad_kd):  # type: ignore[override]
        scale = grad_loss.to(torch.float32)
        scaled = [
            None if grad is None or grad.numel() == 0 else grad * scale.to(grad.dtype) for grad in ctx.saved_tensors
        ]
        return (*scaled, None, None, None, None, None, None)


def _add_kd_gradient(
    grad: torch.Tensor,
    logits: torch.Tensor,
    teacher_head: Head,
    teacher_hidden: torch.Tensor,
    weights: Weights,
    kd_scale: torch.Tensor | float,
) -> torch.Tensor:
    """Adds the KL gradient to grad (d loss / d student logits); returns the chunk's summed KL. Works in
    the buffers of `logits` and of the teacher's logits (log-softmax in place): few chunk-sized tensors."""
    student_log_p = _log_softmax_(logits.div_(weights.temperature))
    with torch.no_grad():
        teacher_logits, _ = teacher_head.logits(teacher_hidden)
    teacher_log_p = _log_softmax_(teacher_logits.div_(weights.temperature))
    teacher_p = teacher_log_p.exp()
    kl = teacher_log_p.sub_(student_log_p).mul_(teacher_p).sum()
    del teacher_log_p, teacher_logits
    grad.add_(student_log_p.exp_().sub_(teacher_p), alpha=float(kd_scale))
    return kl


def _log_softmax_(logits: torch.Tensor) -> torch.Tensor:
    return logits.sub_(torch.logsumexp(logits, dim=-1, keepdim=True))


class _Grads:
    """Gradients of the head's inputs, filled chunk by chunk (only those autograd asks for)."""

    def __init__(self, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, needed: tuple) -> None:
        self.weight = weight
        self.hidden = torch.empty_like(hidden) if needed[0] else None
        self.grad_weight = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needed[1] else None
        self.grad_bias = None
        if bias is not None and needed[2]:
            self.grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
        self.bias_dtype = None if bias is None else bias.dtype

    def add(self, grad: torch.Tensor, h: torch.Tensor, start: int, end: int) -> None:
        low = grad.to(self.weight.dtype)  # the matmuls run in the head's dtype (bf16 on GPUs)
        if self.hidden is not None:
            self.hidden[start:end] = low @ self.weight
        if self.grad_weight is None:
            pass
        elif self.weight.dtype == torch.float32:
            self.grad_weight.addmm_(grad.t(), h.float())
        else:
            self.grad_weight += low.t() @ h.to(self.weight.dtype)
        if self.grad_bias is not None:
            self.grad_bias += grad.sum(0)

    def result(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Tensors for save_for_backward (an empty tensor stands for None)."""
        empty = torch.empty(0)
        weight = empty if self.grad_weight is None else self.grad_weight.to(self.weight.dtype)
        bias = empty if self.grad_bias is None else self.grad_bias.to(self.bias_dtype)
        return (empty if self.hidden is None else self.hidden), weight, bias


# ---- the root modules ----
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
