"""GPUs the plan knows (memory, dense bf16 peak), the one this machine has, and the time a token
budget takes: from a stated or measured throughput, or estimated from the FLOPs of a training step at
a stated model FLOPs utilisation (MFU)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from gqa_convert.planning.shapes import ModelShape

GIB = 1 << 30


@dataclass(frozen=True)
class Gpu:
    label: str
    memory: int  # bytes torch reports as the device's total (approximately)
    peak_flops: float  # dense bf16 FLOP/s (vendor data sheets, without sparsity)
    names: tuple[str, ...]  # every one of these appears in torch.cuda.get_device_name()


GPUS = {
    "a100-40gb": Gpu("A100 40GB", round(39.4 * GIB), 312e12, ("A100", "40GB")),
    "a100-80gb": Gpu("A100 80GB", round(79.2 * GIB), 312e12, ("A100", "80GB")),
    "h100": Gpu("H100 SXM 80GB", round(79.1 * GIB), 989e12, ("H100",)),
    "h100-pcie": Gpu("H100 PCIe 80GB", round(79.1 * GIB), 756e12, ("H100", "PCIe")),
    "h200": Gpu("H200 141GB", round(139.8 * GIB), 989e12, ("H200",)),
}
GPU_CHOICES = ("auto", *GPUS)


@dataclass(frozen=True)
class Target:
    """The device the plan is for: its memory (None: unknown) and peak FLOP/s (None: unknown)."""

    label: str
    memory: int | None
    peak_flops: float | None
    source: str  # detected, --gpu, --gpu-memory, none


def known_gpu(device_name: str) -> Gpu | None:
    """The table's row for a device name; the most specific match wins (H100 PCIe before H100)."""
    found = [gpu for gpu in GPUS.values() if all(name.lower() in device_name.lower() for name in gpu.names)]
    return max(found, key=lambda gpu: len(gpu.names), default=None)


def detect_gpu() -> tuple[str, int, Gpu | None] | None:
    """(name, total bytes, table row) of this machine's first GPU, or None without one."""
    import torch

    if not torch.cuda.is_available():
        return None
    properties = torch.cuda.get_device_properties(0)
    return properties.name, int(properties.total_memory), known_gpu(properties.name)


def plan_target(gpu: str, gpu_memory: int | None) -> Target:
    """--gpu names a row of the table, --gpu-memory states the memory (it wins over the row's); without
    either, the detected GPU; without one, no GPU (the plan still gives its figures)."""
    if gpu != "auto":
        row = GPUS[gpu]
        memory = gpu_memory or row.memory
        return Target(row.label, memory, row.peak_flops, "--gpu-memory" if gpu_memory else "--gpu")
    detected = detect_gpu()
    if gpu_memory is not None:
        row = detected[2] if detected else None
        label = detected[0] if detected else "GPU"
        return Target(label, gpu_memory, row.peak_flops if row else None, "--gpu-memory")
    if detected is None:
        return Target("none detected", None, None, "none")
    name, memory, row = detected
    return Target(name, memory, row.peak_flops if row else None, "detected")


def flops_per_token(
    shape: ModelShape, seq_len: int, trainable: str, checkpointing: bool, teacher: ModelShape | None = None
) -> float:
    """Matmul FLOPs of training on one token: 2N forward, 2N for the activations' gradients, 2N for the
    weights' (trainable ones only), with N the parameters a matmul reads (not the embedding lookup);
    attention 4 L d s forward (QK^T and AV, d = heads x head_dim), twice that backward; checkpointing
    recomputes the layers' forward; a teacher adds its forward."""
    matmul = shape.parameters - (0 if shape.tied else _numel_of(shape, shape.embedding))
    trained = sum(t.numel for t in shape.trainable(trainable) if t.name != shape.embedding or shape.tied)
    attention = 4 * shape.layers * shape.heads * shape.head_dim * seq_len
    flops = 4 * matmul + 2 * trained + 3 * attention
    if checkpointing:
        layers = sum(t.numel for t in shape.tensors if t.group >= 0)
        flops += 2 * layers + attention
    if teacher is not None:
        teacher_matmul = teacher.parameters - (0 if teacher.tied else _numel_of(teacher, teacher.embedding))
        flops += 2 * teacher_matmul + 4 * teacher.layers * teacher.heads * teacher.head_dim * seq_len
    return float(flops)


def _numel_of(shape: ModelShape, name: str) -> int:
    return next(t.numel for t in shape.tensors if t.name == name)


def duration(tokens: int, tokens_per_s_per_gpu: float, world: int) -> dict[str, Any]:
    """Hours and GPU-hours of `tokens` at a per-GPU throughput over `world` GPUs."""
    seconds = tokens / (tokens_per_s_per_gpu * world)
    return {
        "tokens_per_s_per_gpu": round(tokens_per_s_per_gpu, 1),
        "hours": round(seconds / 3600, 3),
        "gpu_hours": round(seconds * world / 3600, 2),
        "days": round(seconds / 86400, 2),
    }


def estimated_throughput(flops: float, peak_flops: float, mfu: float) -> float:
    """Tokens per second per GPU when the step's FLOPs run at `mfu` of the peak."""
    if not (math.isfinite(flops) and flops > 0):
        raise ValueError("flops must be positive")
    return peak_flops * mfu / flops
