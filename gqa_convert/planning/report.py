"""The plan as a table on the terminal, from its JSON form (RunPlan.to_dict): one source for both."""

from __future__ import annotations

from typing import Any

from gqa_convert.planning.memory import MARGIN_FRACTION, MARGIN_GPU_BYTES
from gqa_convert.units import human_bytes

_PARAMETERS = {
    "ddp": "fp32, whole on every GPU",
    "fsdp2": "fp32 master weights, 1/{world} each",
    "deepspeed": "{low} partition (1/{world}) and fp32 master weights",
}
_BUFFERS = {"ddp": "DistributedDataParallel's gradient buckets", "deepspeed": "ZeRO-3 reduce bucket"}


def _rows(plan: dict[str, Any]) -> list[tuple[str, int | None, str]]:
    memory, world, strategy = plan["memory"], plan["processes"], plan["strategy"]
    low = "fp32" if plan["precision"] == "no" else "16-bit"
    teacher = f"frozen, {'bf16' if plan['precision'] == 'bf16' else 'fp32'}"
    if strategy != "ddp":
        teacher += f", 1/{world} each"
    sharded = "" if strategy == "ddp" else f", 1/{world} each"
    return [
        ("parameters", memory["parameters"], _PARAMETERS[strategy].format(world=world, low=low)),
        ("gradients", memory["gradients"], f"{'fp32' if strategy != 'deepspeed' else low}{sharded}"),
        ("optimizer state", memory["optimizer"], f"AdamW: two fp32 moments{sharded}"),
        ("teacher", memory["teacher"] or None, teacher),
        ("buffers", memory["buffers"] or None, _BUFFERS.get(strategy, "")),
        ("activations", memory["activations"], "kept for backward at the end of the forward"),
    ]


def _size(count: int | None) -> str:
    return "-" if count is None else human_bytes(count)


def format_plan(plan: dict[str, Any]) -> str:
    """A readable summary of `uptrain --dry-run` (the same figures as its --json form)."""
    memory, gpu = plan["memory"], plan["gpu"]
    machines = f" on {plan['machines']} machines" if plan["machines"] > 1 else ""
    device = "GPUs" if plan["device"] == "cuda" else "CPU"
    precision = "fp32" if plan["precision"] == "no" else plan["precision"]
    lines = [
        f"plan: {plan['model']} ({plan['model_type']}, {plan['parameters'] / 1e9:.2f}B parameters), "
        f"{plan['strategy']} over {plan['processes']} processes{machines}, {precision} on {device}",
        f"budget: {plan['tokens']:,} tokens ({plan['budget']}) = {plan['steps']:,} steps of "
        f"{plan['global_batch_tokens']:,} tokens (micro-batch {plan['micro_batch_size']} x {plan['seq_len']} x "
        f"{plan['grad_accum']} accumulation x {plan['processes']} processes)",
        "",
        f"memory per {'GPU' if plan['device'] == 'cuda' else 'process'} (micro-batch {plan['micro_batch_size']} x "
        f"{plan['seq_len']} tokens, checkpointing {'on' if plan['gradient_checkpointing'] else 'off'}, "
        f"trainable {plan['trainable']})",
    ]
    for name, count, note in _rows(plan):
        lines.append(f"  {name:16s}{_size(count):>12s}   {note if count is not None else ''}".rstrip())
    margin = f"{MARGIN_FRACTION:.0%} of the peak (allocator)" + (
        f" + {human_bytes(MARGIN_GPU_BYTES)} (CUDA context, workspaces)" if plan["device"] == "cuda" else ""
    )
    phases = ", ".join(f"{phase} {_size(count)}" for phase, count in memory["phases"].items())
    lines += [
        f"  {'peak':16s}{_size(memory['peak']):>12s}   at the {memory['peak_phase']} (phases: {phases})",
        f"  {'margin':16s}{_size(memory['margin']):>12s}   {margin}",
        f"  {'required':16s}{_size(memory['required']):>12s}",
    ]
    other = plan["other_checkpointing"]
    lines.append(
        f"  checkpointing {'on' if other['gradient_checkpointing'] else 'off'} instead: activations "
        f"{_size(other['activations'])}, required {_size(other['required'])}"
    )
    if memory["approximate"]:
        lines.append(f"  (activations follow a Llama-style layer: approximate for {plan['model_type']})")
    lines.append("")
    if gpu["memory"] is None:
        lines.append("GPU: none detected; pass --gpu (h100, a100-80gb, ...) or --gpu-memory 80GB to check the fit")
    else:
        verdict = "fits" if plan["fits"] else f"does NOT fit (short by {_size(memory['required'] - gpu['memory'])})"
        name = "" if gpu["source"] == "--gpu-memory" and gpu["name"] == "GPU" else f"{gpu['name']}, "
        lines.append(f"GPU: {name}{_size(gpu['memory'])} ({gpu['source']}): {verdict}")
    if plan["fits"] is False:
        if plan["changes"]:
            lines.append("smallest changes that fit (memory required per GPU):")
            lines += [f"  {change['change']:60s}{_size(change['required']):>12s}" for change in plan["changes"]]
        else:
            lines.append(f"no change up to 4096 GPUs fits {_size(gpu['memory'])}: choose a larger GPU")
    time = plan["time"]
    if time is None:
        lines.append(plan["time_note"])
    else:
        lines.append(
            f"time: {time['hours']:,.1f} hours ({time['days']:,.2f} days), {time['gpu_hours']:,.0f} GPU-hours at "
            f"{time['tokens_per_s_per_gpu']:,.1f} tokens/s per GPU ({time['source']})"
        )
    if "measured_step_s" in plan:
        lines.append(f"measured: one step took {plan['measured_step_s']} s on this machine's {plan['measured_on']}")
    return "\n".join(lines)
