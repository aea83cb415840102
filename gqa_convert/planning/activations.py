"""What one micro-batch's training step keeps for backward, and its working set, for a Llama-style
decoder as transformers runs it (RMSNorm, SDPA attention with grouped kv heads, gated MLP) and the
chunked losses of train.losses. Every figure is bytes on one device.

A decoder layer keeps, per token (read from the autograd graph; tests/test_planning.py checks it
against the tensors autograd saves):

    norm inputs             2 x hidden   (RMSNorm squares its input in fp32: an fp32 copy when not fp32)
    normalized              2 x hidden   (what the norm's weight multiplies)
    norm outputs            2 x hidden   (the projections' input: q/k/v share one, gate/up another)
    q, attention output     2 x heads x head_dim   (SDPA keeps q and its output; o_proj reads the output)
    k, v                    2 x kv_heads x head_dim
    MLP                     4 x mlp width   (gate, up, activation, their product)
    statistics              2 + heads   fp32 (the norms' 1/rms, SDPA's log-sum-exp)

The element sizes depend on how the strategy computes (PRECISIONS). With gradient checkpointing a
layer keeps only its input and recomputes the rest during its backward. Outside the layers: the token
ids, the final norm, and the chunked loss, which computes its gradients during the forward and keeps
d loss / d hidden [positions, hidden] and d loss / d head [vocab, hidden]; its working set is a few
[chunk, vocab] fp32 tensors.
"""

from __future__ import annotations

from dataclasses import dataclass

from gqa_convert.planning.shapes import ModelShape
from gqa_convert.train.losses import DEFAULT_CHUNK_BYTES, positions_per_chunk

# bytes per element of each kind of saved tensor:
#   fp32      everything in fp32 (CPU, --mixed-precision no)
#   bf16      parameters cast to 16 bits, no autocast (fsdp2's MixedPrecisionPolicy, DeepSpeed): the
#             residual stream is 16-bit, RMSNorm's fp32 copy of its input is 4 bytes
#   autocast  fp32 parameters under torch.autocast (ddp on GPUs): fp32 residual stream and norms,
#             16-bit copies of the projections' inputs, 16-bit matmul outputs
PRECISIONS = {
    "fp32": {"norm_input": 4, "normed": 4, "matmul_input": 4, "compute": 4, "residual": 4, "head": 4},
    "bf16": {"norm_input": 4, "normed": 2, "matmul_input": 2, "compute": 2, "residual": 2, "head": 2},
    "autocast": {"norm_input": 4, "normed": 4, "matmul_input": 2, "compute": 2, "residual": 4, "head": 4},
}


def _layer_elements(shape: ModelShape, trainable: str) -> tuple[tuple[str, int, str], ...]:
    """(what, elements per token, kind) that a decoder layer keeps for backward. A frozen weight needs
    no copy of its input: under --trainable attention the norms' weights, the MLP and so their inputs
    are frozen (the activations' gradients still flow through them)."""
    attention = shape.heads * shape.head_dim
    kv = shape.kv_heads * shape.head_dim
    everything = trainable == "all"
    return (
        ("norm inputs", 2 * shape.hidden, "norm_input"),
        ("normalized", 2 * shape.hidden if everything else 0, "normed"),
        ("norm outputs", (2 if everything else 1) * shape.hidden, "matmul_input"),
        ("q, attention output", 2 * attention, "compute"),
        ("k, v", 2 * kv, "compute"),
        ("MLP", (4 if everything else 3) * shape.mlp_width, "compute"),
        ("statistics", 2 + shape.heads, "fp32"),
    )


def layer_bytes_per_token(shape: ModelShape, precision: str, trainable: str = "all") -> int:
    sizes = {**PRECISIONS[precision], "fp32": 4}
    return sum(elements * sizes[kind] for _, elements, kind in _layer_elements(shape, trainable))


@dataclass(frozen=True)
class Activations:
    """One micro-batch's activation memory on one device, in bytes."""

    per_layer: int  # what one layer keeps (its input alone under checkpointing)
    layers: int  # every layer together
    outside: int  # token ids and the final norm
    loss_saved: int  # the chunked loss's gradients, kept from forward to backward
    loss_working: int  # the loss's working set at the end of the forward
    backward_working: int  # one layer's backward: its recomputation under checkpointing, gradients in flight
    teacher_hidden: int  # the teacher's final hidden states, read by the loss (distillation only)

    @property
    def saved(self) -> int:
        """Kept at the end of the forward, before the loss's working set."""
        return self.layers + self.outside + self.loss_saved + self.teacher_hidden


def activations(
    shape: ModelShape,
    micro_batch: int,
    seq_len: int,
    precision: str,
    checkpointing: bool,
    trainable: str = "all",
    teacher: ModelShape | None = None,
    teacher_bytes: int = 4,
) -> Activations:
    sizes = PRECISIONS[precision]
    tokens = micro_batch * seq_len
    positions = micro_batch * (seq_len - 1)  # predicted positions
    head_trains = trainable == "all"
    full_layer = tokens * layer_bytes_per_token(shape, precision, trainable)
    kept = tokens * shape.hidden * sizes["residual"] if checkpointing else full_layer
    outside = tokens * (8 + shape.hidden * (sizes["norm_input"] + sizes["normed"]))
    loss_saved = positions * shape.hidden * sizes["residual"]
    if head_trains:
        loss_saved += shape.vocab * shape.hidden * sizes["head"]
    chunk = min(positions, positions_per_chunk(shape.vocab, DEFAULT_CHUNK_BYTES))
    per_position = 8  # fp32 logits and their gradient
    if sizes["head"] != 4:
        per_position += 2  # the gradient in the head's dtype, for the matmuls
    if teacher is not None:
        per_position += 8  # the teacher's fp32 logits and probabilities
    loss_working = chunk * shape.vocab * per_position
    if sizes["head"] != 4 and head_trains:  # an fp32 accumulator of d loss / d head beside its 16-bit copy
        loss_working += shape.vocab * shape.hidden * (4 + 2)
    # a layer's backward holds gradients of its output, of the residual stream and of an MLP intermediate
    backward = tokens * (3 * shape.hidden * 4 + shape.mlp_width * sizes["compute"])
    if checkpointing:
        backward += full_layer
    teacher_hidden = 0
    if teacher is not None:  # its final hidden states and the loss's [positions, hidden] view of them
        teacher_hidden = (tokens + positions) * teacher.hidden * teacher_bytes
    return Activations(
        per_layer=kept,
        layers=kept * shape.layers,
        outside=outside,
        loss_saved=loss_saved,
        loss_working=loss_working,
        backward_working=backward,
        teacher_hidden=teacher_hidden,
    )


def teacher_forward_working(teacher: ModelShape, micro_batch: int, seq_len: int, teacher_bytes: int) -> int:
    """The teacher's forward keeps nothing for backward: at most one layer's intermediates at a time."""
    tokens = micro_batch * seq_len
    return tokens * (4 * teacher.hidden * 4 + 3 * teacher.mlp_width * teacher_bytes)
