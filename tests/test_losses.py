"""The chunked losses against the unchunked computation: the same loss values and the same gradient for
every student parameter (oracle: transformers' full logits, F.cross_entropy and the KL of the full
log-softmaxes), for every supported architecture's output head."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from gqa_convert.train.losses import (
    IGNORE_INDEX,
    CausalLMWithChunkedLoss,
    FrozenTeacher,
    Head,
    Weights,
    head_losses,
    head_of,
)

from tiny_models import TINY, VOCAB, tiny_config


def reference_losses(student_logits, labels, teacher_logits, weights: Weights):
    """The unchunked computation: full [B, S, V] fp32 logits, shifted cross-entropy, T^2 KL."""
    vocab = student_logits.shape[-1]
    lm = F.cross_entropy(
        student_logits[:, :-1].float().reshape(-1, vocab), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )
    if teacher_logits is None:
        return weights.lm * lm, lm.detach(), torch.zeros(())
    temperature = weights.temperature
    student = torch.log_softmax(student_logits[:, :-1].float() / temperature, dim=-1).flatten(0, 1)
    teacher = torch.log_softmax(teacher_logits[:, :-1].float() / temperature, dim=-1).flatten(0, 1)
    kd = F.kl_div(student, teacher, log_target=True, reduction="batchmean") * temperature**2
    return weights.lm * lm + weights.kd * kd, lm.detach(), kd.detach()


def tiny(kv_heads: int, seed: int, tied: bool = True) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=300,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=64,
        tie_word_embeddings=tied,
        use_cache=False,
    )
    return LlamaForCausalLM(config)


def batch(vocab: int = 300, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, vocab, (3, 17), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[0, 5:9] = IGNORE_INDEX
    return ids, labels


def compare(chunked: CausalLMWithChunkedLoss, reference_model, teacher, ids, labels, weights: Weights) -> None:
    teacher_hidden = teacher_head = teacher_logits = None
    if teacher is not None:
        with torch.no_grad():
            teacher_hidden = teacher(ids)
            teacher_head = head_of(teacher.causal_lm)
            teacher_logits = teacher.causal_lm(input_ids=ids).logits
    parts = chunked(ids, labels=labels, teacher_hidden=teacher_hidden, teacher_head=teacher_head, weights=weights)
    parts.loss.backward()
    expected, lm, kd = reference_losses(reference_model(input_ids=ids).logits, labels, teacher_logits, weights)
    expected.backward()
    torch.testing.assert_close(parts.loss, expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.lm, lm, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(parts.kd, kd, rtol=1e-5, atol=1e-6)
    if teacher is not None:
        assert parts.kd > 1e-3  # a real teacher signal, not a vacuous zero
    got = dict(chunked.causal_lm.named_parameters())
    for name, parameter in reference_model.named_parameters():
        if parameter.grad is not None:
            torch.testing.assert_close(got[name].grad, parameter.grad, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("with_teacher", [False, True])
@pytest.mark.parametrize("chunk_bytes", [4 * 300 * 7, 4 * 300 * 1000])  # 7 positions per chunk, or one chunk
@pytest.mark.parametrize("tied", [True, False])
def test_chunked_matches_unchunked(with_teacher: bool, chunk_bytes: int, tied: bool) -> None:
    base = tiny(kv_heads=2, seed=0, tied=tied)
    reference_model = copy.deepcopy(base)
    chunked = CausalLMWithChunkedLoss(base, chunk_bytes=chunk_bytes)
    assert chunked.chunk == (7 if chunk_bytes == 4 * 300 * 7 else 1000)
    teacher = FrozenTeacher(tiny(kv_heads=4, seed=1)) if with_teacher else None
    weights = Weights(lm=0.7, kd=0.3, temperature=2.0) if with_teacher else Weights()
    compare(chunked, reference_model, teacher, *batch(), weights)


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_every_architecture_head(model_type: str) -> None:
    """Biases (phi), logit scales (cohere, granite) and soft caps (gemma2/3) applied as transformers does,
    with a teacher of the same architecture; 5 positions per chunk."""
    overrides = {"cohere": {"logit_scale": 3.0}, "granite": {"logits_scaling": 0.25}}.get(model_type, {})
    if model_type in ("gemma2", "gemma3_text"):
        overrides = {"final_logit_softcapping": 2.0}
    import transformers

    torch.manual_seed(0)
    student = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    torch.manual_seed(1)
    teacher = transformers.AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    for model in (student, teacher):
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.normal_(0.0, 0.1)  # big enough that a missing scale or cap shows
    reference_model = copy.deepcopy(student)
    chunked = CausalLMWithChunkedLoss(student, chunk_bytes=4 * VOCAB * 5)
    compare(chunked, reference_model, FrozenTeacher(teacher), *batch(VOCAB), Weights(0.5, 0.5, 1.0))


def test_hf_loss_agrees_with_reference() -> None:
    """The oracle itself: its LM part is what transformers computes from labels."""
    model = tiny(kv_heads=2, seed=0)
    ids, labels = batch()
    output = model(input_ids=ids, labels=labels)
    torch.testing.assert_close(reference_losses(output.logits, labels, None, Weights())[1], output.loss.detach())


def test_scaled_backward_and_frozen_weight() -> None:
    """grad_output scaling (accumulation divides the loss) and a frozen weight (no grad_weight)."""
    torch.manual_seed(0)
    hidden = torch.randn(11, 8, requires_grad=True)
    weight = torch.randn(50, 8)
    labels = torch.randint(0, 50, (11,))
    (head_losses(hidden, Head(weight), labels, chunk=4).loss * 0.25).backward()
    reference = hidden.detach().clone().requires_grad_(True)
    (F.cross_entropy(reference @ weight.t(), labels) * 0.25).backward()
    torch.testing.assert_close(hidden.grad, reference.grad, rtol=1e-5, atol=1e-7)


def test_no_grad_evaluation_gives_same_loss() -> None:
    torch.manual_seed(0)
    hidden = torch.randn(9, 8, requires_grad=True)
    weight = torch.randn(40, 8, requires_grad=True)
    labels = torch.randint(0, 40, (9,))
    with torch.no_grad():
        evaluated = head_losses(hidden, Head(weight), labels, chunk=4).loss
    assert not evaluated.requires_grad
    torch.testing.assert_close(evaluated, F.cross_entropy(hidden @ weight.t(), labels).detach())
