"""The memory one device needs for a training step, by strategy, as train/ lays the run out:

    ddp        every process: fp32 weights, fp32 gradients, AdamW's two fp32 moments (fused step, no
               temporaries); with several processes DistributedDataParallel's gradient buckets (another
               fp32 copy of the gradients); under bf16/fp16 autocast a 16-bit copy of every matrix,
               kept from the forward through the backward. The teacher whole, in bf16 when training in bf16.
    fsdp2      1/N of every tensor (split along dim 0, padded): fp32 master weights, fp32 gradients and
               moments; gathered whole in the compute dtype while used: the root group (embeddings,
               final norm, head) from forward to the end of backward, and a decoder layer with the next
               one prefetched; a layer's gradients whole until reduce-scattered in fp32. AdamW's foreach
               step holds a copy of the moments on GPUs. The teacher sharded alike (its root gathered
               from its forward until the student's loss has read the head).
    deepspeed  ZeRO-3 with DeepSpeed's defaults: 1/N of the 16-bit weights, fp32 master weights (not
               when training in fp32: they are the weights), fp32 moments, a 16-bit gradient partition,
               the 5e8-element reduce bucket, parameters under 1e5 elements whole on every process; the
               step converts the gradient partition to fp32. The teacher its own ZeRO-3 engine.

A step's peak is the largest of its phases: the teacher's forward, the end of the student's forward
(every activation kept, the loss's working set), the backward (activations freed as gradients
arrive), the optimizer step. Gradients of earlier micro-batches are held when accumulating.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from gqa_convert.planning.activations import Activations, activations, teacher_forward_working
from gqa_convert.planning.shapes import ROOT, ModelShape, Tensor

DEEPSPEED_REDUCE_BUCKET = 500_000_000  # elements (DeepSpeed's reduce_bucket_size default)
DEEPSPEED_PERSISTENCE = 100_000  # parameters smaller than this are not partitioned
GIB = 1 << 30
MARGIN_FRACTION = 0.10  # allocator fragmentation and cached blocks
MARGIN_GPU_BYTES = 1 * GIB  # CUDA context, cuBLAS and NCCL workspaces per process


@dataclass(frozen=True)
class StepSetup:
    """What a step's memory depends on, besides the model."""

    strategy: str  # ddp, fsdp2, deepspeed
    world: int
    precision: str  # no, bf16, fp16
    device: str  # cuda or cpu
    micro_batch: int
    seq_len: int
    grad_accum: int = 1
    checkpointing: bool = False
    trainable: str = "all"

    @property
    def compute(self) -> str:
        """The activation model's precision kind (planning.activations.PRECISIONS)."""
        if self.precision == "no":
            return "fp32"
        return "autocast" if self.strategy == "ddp" else "bf16"


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device. `peak` is what is held at the step's fullest moment; `required` adds the margin."""

    setup: StepSetup
    parameters: int
    gradients: int
    optimizer: int
    teacher: int
    buffers: int  # DDP's gradient buckets, DeepSpeed's reduce bucket
    activations: int  # kept at the end of the forward
    peak: int
    peak_phase: str
    phases: dict[str, int]
    margin: int
    approximate: bool  # the activation model is Llama-style and the architecture is not

    @property
    def required(self) -> int:
        return self.peak + self.margin


@dataclass(frozen=True)
class _Layout:
    """What a strategy holds on one device (bytes)."""

    parameters: int
    gradients: int  # all trainable gradients, as held (sharded or not)
    head_gradient: int  # the part of them that arrives first in backward (the head's)
    head_whole: int  # the head's gradient whole beside its shard, through the backward (sharded strategies)
    late_gradients: int  # the part that arrives after the backward's fullest moment (first layer, embedding)
    optimizer: int
    teacher: int
    buffers: int
    gathered: int  # student parameters gathered whole during forward and backward
    teacher_gathered: int  # teacher parameters gathered during the student's forward
    teacher_forward_gathered: int  # and during the teacher's own forward
    in_flight: int  # unsharded gradients of a layer before their reduction
    step: int  # temporaries of the optimizer step
    autocast_copies: int  # 16-bit copies of the matrices under autocast


def _shard(tensors: tuple[Tensor, ...], world: int) -> int:
    """Elements per process when every tensor is split along dim 0 over `world` (FSDP2 pads)."""
    return sum(math.ceil(t.rows / world) * (t.numel // max(t.rows, 1)) for t in tensors)


def _numel(tensors: tuple[Tensor, ...]) -> int:
    return sum(t.numel for t in tensors)


def _head(shape: ModelShape, trainable: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The output head among the trainable tensors (its gradient arrives first in backward)."""
    return tuple(t for t in trainable if t.group == ROOT and (t.name != shape.embedding or shape.tied))


def _late(shape: ModelShape, trainable: tuple[Tensor, ...]) -> tuple[Tensor, ...]:
    """The gradients computed last in backward: the first layer's and the input embedding's."""
    return tuple(t for t in trainable if t.group == 0 or (t.name == shape.embedding and not shape.tied))


def _ddp(shape: ModelShape, setup: StepSetup, teacher: ModelShape | None, teacher_bytes: int) -> _Layout:
    trainable = shape.trainable(setup.trainable)
    grads = 4 * _numel(trainable)
    copies = 2 * shape.matrices(include_embedding=shape.tied) if setup.compute == "autocast" else 0
    return _Layout(
        parameters=4 * shape.parameters,
        gradients=grads,
        head_gradient=4 * _numel(_head(shape, trainable)),
        head_whole=0,
        late_gradients=4 * _numel(_late(shape, trainable)),
        optimizer=2 * grads,  # fused AdamW: exp_avg and exp_avg_sq, no temporaries
        teacher=teacher_bytes * teacher.parameters if teacher else 0,
        buffers=grads if setup.world > 1 else 0,  # DistributedDataParallel's buckets
        gathered=0,
        teacher_gathered=0,
        teacher_forward_gathered=0,
        in_flight=0,
        step=0,
        autocast_copies=copies,
    )


def _fsdp2(shape: ModelShape, setup: StepSetup, teacher: ModelShape | None, teacher_bytes: int) -> _Layout:
    world, unsharded = setup.world, 2 if setup.compute == "bf16" else 4
    trainable = shape.trainable(setup.trainable)
    grads = 4 * _shard(trainable, world)
    root = _numel(shape.group(ROOT))
    layer_trainable = shape.largest_trainable_layer(setup.trainable)
    if setup.device == "cuda":
        step = 4 * _shard(trainable, world)  # foreach AdamW: sqrt of the second moments, all at once
    else:
        step = 8 * max((math.ceil(t.rows / world) * (t.numel // t.rows) for t in trainable), default=0)
    teacher_layout = teacher_root = teacher_layers = 0
    if teacher is not None:
        teacher_layout = teacher_bytes * _shard(teacher.tensors, world)
        teacher_root = teacher_bytes * _numel(teacher.group(ROOT))
        teacher_layers = 2 * teacher_bytes * teacher.largest_layer
    return _Layout(
        parameters=4 * _shard(shape.tensors, world),
        gradients=grads,
        head_gradient=0,
        head_whole=unsharded * _numel(_head(shape, trainable)),  # until the root's reduce-scatter
        late_gradients=4 * _shard(_late(shape, trainable), world),
        optimizer=2 * grads,
        teacher=teacher_layout,
        buffers=0,
        # on GPUs the next layer's all-gather overlaps the current one's compute; on CPU they take turns
        gathered=unsharded * (root + (2 if setup.device == "cuda" else 1) * shape.largest_layer),
        teacher_gathered=teacher_root,
        teacher_forward_gathered=teacher_root + teacher_layers,
        in_flight=(unsharded + 4) * layer_trainable,
        step=step,
        autocast_copies=0,
    )


def _deepspeed(shape: ModelShape, setup: StepSetup, teacher: ModelShape | None, teacher_bytes: int) -> _Layout:
    world, low = setup.world, 4 if setup.precision == "no" else 2
    trainable = shape.trainable(setup.trainable)
    persistent = _numel(tuple(t for t in shape.tensors if t.numel < DEEPSPEED_PERSISTENCE))
    partition = math.ceil((shape.parameters - persistent) / world) + persistent
    trainable_partition = math.ceil(_numel(trainable) / world)
    master = 4 * trainable_partition if low != 4 else 0
    root = _numel(shape.group(ROOT))
    teacher_layout = teacher_root = teacher_layers = 0
    if teacher is not None:
        teacher_layout = teacher_bytes * math.ceil(teacher.parameters / world)
        teacher_root = teacher_bytes * _numel(teacher.group(ROOT))
        teacher_layers = 2 * teacher_bytes * teacher.largest_layer
    layer_trainable = shape.largest_trainable_layer(setup.trainable)
    return _Layout(
        parameters=low * partition + master,
        gradients=low * trainable_partition,
        head_gradient=0,
        head_whole=low * _numel(_head(shape, trainable)),
        late_gradients=low * math.ceil(_numel(_late(shape, trainable)) / world),
        optimizer=8 * trainable_partition,
        teacher=teacher_layout,
        buffers=low * DEEPSPEED_REDUCE_BUCKET,  # allocated whole, whatever the model's size
        gathered=low * (root + 2 * shape.largest_layer),
        teacher_gathered=teacher_root,
        teacher_forward_gathered=teacher_root + teacher_layers,
        in_flight=low * layer_trainable,
        # the gradient partition flattened, converted to fp32, and foreach AdamW's copy of the moments
        step=(low + 4 + 4) * trainable_partition,
        autocast_copies=0,
    )


STRATEGIES = {"ddp": _ddp, "fsdp2": _fsdp2, "deepspeed": _deepspeed}


def plan_memory(shape: ModelShape, setup: StepSetup, teacher: ModelShape | None = None) -> MemoryPlan:
    """The memory of one training step on one device (see the module's docstring for what is counted)."""
    teacher_bytes = 2 if setup.precision == "bf16" else 4  # the teacher is stored in bf16 when training in bf16
    layout = STRATEGIES[setup.strategy](shape, setup, teacher, teacher_bytes)
    acts = activations(
        shape,
        setup.micro_batch,
        setup.seq_len,
        setup.compute,
        setup.checkpointing,
        setup.trainable,
        teacher,
        teacher_bytes,
    )
    base = layout.parameters + layout.optimizer + layout.teacher + layout.buffers
    earlier = layout.gradients if setup.grad_accum > 1 else 0  # earlier micro-batches' gradients
    phases = _phases(layout, acts, base, earlier, shape.layers)
    if teacher is not None:
        working = teacher_forward_working(teacher, setup.micro_batch, setup.seq_len, teacher_bytes)
        phases["teacher forward"] = base + earlier + layout.teacher_forward_gathered + working
    peak_phase = max(phases, key=phases.__getitem__)
    peak = phases[peak_phase]
    margin = round(MARGIN_FRACTION * peak) + (MARGIN_GPU_BYTES if setup.device == "cuda" else 0)
    return MemoryPlan(
        setup=setup,
        parameters=layout.parameters,
        gradients=layout.gradients,
        optimizer=layout.optimizer,
        teacher=layout.teacher,
        buffers=layout.buffers,
        activations=acts.saved,
        peak=peak,
        peak_phase=peak_phase,
        phases=phases,
        margin=margin,
        approximate=not shape.llama_style,
    )


def _phases(layout: _Layout, acts: Activations, base: int, earlier: int, layers: int) -> dict[str, int]:
    during = base + layout.gathered + layout.autocast_copies
    forward_end = during + earlier + acts.saved + acts.loss_working + layout.teacher_gathered
    # backward: activations freed layer by layer while gradients arrive; linear in between, so the
    # fullest moment is at its start or its end
    start = max(earlier, layout.head_gradient) + acts.layers
    end = max(earlier, layout.gradients - layout.late_gradients) + acts.layers // max(layers, 1)
    held = layout.head_whole + acts.outside + acts.teacher_hidden
    backward = during + max(start, end) + held + acts.backward_working + layout.in_flight
    return {
        "end of forward": forward_end,
        "backward": backward,
        "optimizer step": base + layout.gradients + layout.step,
    }
