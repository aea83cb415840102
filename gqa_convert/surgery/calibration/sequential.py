"""The per-layer calibration pass, one decoder layer on the device at a time.

Two residual streams run through the layers: the source model's (the teacher) and, with sequential
calibration, the converted model's (the student: GPTQ-style, each layer is calibrated on the inputs
the already merged layers before it produce, so it learns to correct what they lost). Per layer:
the teacher's attention outputs (and, for block refinement, its layer outputs) are the targets; the
student's attention inputs give the statistics
(the second moment of [x, 1], its mean, and each query head's attended moment from the layer's own
attention probabilities); a visitor merges the layer and returns its attention weights in the source's layout
(merged kv heads repeated to every member of their group: the same function as the merged layer),
which then carry the student stream to the next layer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gqa_convert.arch import head_dim_of, rotary_dim
from gqa_convert.io.sources import Checkpoint
from gqa_convert.surgery.calibration.activations import (
    Batch,
    first_layer_inputs,
    layer_config,
    layer_template,
    layer_types,
    load_layer,
)
from gqa_convert.surgery.calibration.keys import rotary_pairs
from gqa_convert.surgery.calibration.settings import Calibration

BATCH_SIZE = 4  # calibration windows per forward

# One call of an attention module: its hidden-states input, its other keyword arguments, its target output.
AttentionCall = tuple[torch.Tensor, dict[str, Any], torch.Tensor]


class _Caught(Exception):
    pass


@dataclass
class LayerCalibration:
    """What the merge of one layer may use. Moments are float64 over [x, 1] (x: the attention input)."""

    index: int
    module: Any  # the layer's attention module with the source weights (eager, on the device)
    calls: list[AttentionCall]  # per batch: student attention input, kwargs, teacher attention output
    blocks: list[AttentionCall]  # per batch: student layer input, kwargs, teacher layer output
    moment: torch.Tensor  # sum of [x, 1][x, 1]^T
    mean: torch.Tensor  # mean of [x, 1]
    tokens: int
    # sum over tokens of z z^T (values.py): per query head (nh, d + 1, d + 1) for the per-head V moment,
    # else averaged over the heads (d + 1, d + 1); None for the plain moment
    attended: torch.Tensor | None
    pairs: list[tuple[int, int]]  # RoPE pairs, then the non-rotary dimensions paired
    rotary_dim: int
    key_norm: bool  # K is normalised after its projection: no change of K commutes with that
    make_layer: Callable[[int], Any]  # kv heads -> this decoder layer (eager, device), attention freshly built
    projections: dict[str, str]  # role (q, k, v, o) -> the projection's name inside the attention module
    attention_name: str  # the attention module's name inside the decoder layer
    kv_norms: dict[str, torch.Tensor] = field(default_factory=dict)  # merged k norms, source layout (set per plan)

    @property
    def device(self) -> torch.device:
        return self.moment.device


# the visitor: merges one layer; returns the attention module's new state (source layout), or None
LayerVisitor = Callable[[LayerCalibration], dict[str, torch.Tensor] | None]


def _attention_calls(layer: Any, attention: Any, batches: list[Batch], run_all: bool):
    """Run the layer over the batches; per batch the attention's input, kwargs and output, and (when
    run_all) the layer's outputs. Without run_all the layer stops after its attention."""
    calls: list[AttentionCall] = []
    outputs: list[torch.Tensor] = []

    def record(module: Any, args: tuple, kwargs: dict, output: Any) -> None:
        hidden = args[0] if args else kwargs["hidden_states"]
        rest = {k: v for k, v in kwargs.items() if k != "hidden_states"}
        calls.append((hidden.detach(), rest, output[0].detach()))
        if not run_all:
            raise _Caught

    handle = attention.register_forward_hook(record, with_kwargs=True)
    with torch.no_grad():
        for batch in batches:
            try:
                output = layer(batch.hidden, **batch.kwargs)
                outputs.append(output[0] if isinstance(output, tuple) else output)
            except _Caught:
                pass
    handle.remove()
    return calls, outputs


def _statistics(attention: Any, calls: list[AttentionCall], value_moment: str):
    """The moment and mean of [x, 1] and the attended moments the V merge needs, from the source
    attention: per query head, averaged over the heads, or none (plain)."""
    width = calls[0][0].shape[-1] + 1
    device = calls[0][0].device
    moment = torch.zeros(width, width, dtype=torch.float64, device=device)
    total = torch.zeros(width, dtype=torch.float64, device=device)
    over = None
    count = 0
    for hidden, kwargs, _ in calls:
        x = torch.cat([hidden, torch.ones(*hidden.shape[:-1], 1, device=device)], dim=-1)  # (B, T, d + 1)
        flat = x.reshape(-1, width).double()
        moment += flat.T @ flat
        total += flat.sum(0)
        count += len(flat)
        if value_moment != "plain":
            with torch.no_grad():
                probs = attention(hidden_states=hidden, **kwargs)[1]  # (B, nh, T, T)
            heads = probs.shape[1]
            if over is None:  # one (d + 1)^2 moment per head, or their average: summed in place
                shape = (heads, width, width) if value_moment == "per-head" else (width, width)
                over = torch.zeros(shape, dtype=torch.float64, device=device)
            for head in range(heads):  # one at a time: all heads' at once are GBs for a 70B shape
                # the head's attended inputs z_m = sum_n a(m, n) x_n; moments summed in float64 (float32
                # sums of the residual stream's large activations are not PSD)
                rows = (probs[:, head] @ x).reshape(-1, width).double()
                if value_moment == "per-head":
                    over[head].addmm_(rows.T, rows)
                else:
                    over.addmm_(rows.T, rows, alpha=1 / heads)
    return moment, total / count, count, over


def run_layers(
    checkpoint: Checkpoint, ids: torch.Tensor, calibration: Calibration, key_norm: bool, visit: LayerVisitor
) -> None:
    """Calibrate every layer in order; `visit` merges each (see the module docstring)."""
    device = calibration.torch_device()
    hidden, kwargs_by_type = first_layer_inputs(checkpoint, ids, device, BATCH_SIZE)
    types = layer_types(checkpoint)
    teacher = hidden
    student = hidden if calibration.sequential else None
    template = layer_template(checkpoint)
    arch = checkpoint.architecture
    projections = {role: name.split(".", 1)[1] for role, name in (arch.projections or {}).items()}
    hd = head_dim_of(checkpoint.config)
    rotary = rotary_dim(checkpoint.config, hd)
    for index in range(int(checkpoint.config.num_hidden_layers)):
        kwargs = kwargs_by_type[types[index]]
        layer = load_layer(checkpoint, index, device, template)
        attention = getattr(layer, arch.attention_module)
        teacher_calls, outputs = _attention_calls(layer, attention, _batches(teacher, kwargs), run_all=True)
        inputs = student if student is not None else teacher
        blocks = [(x, rest, target) for x, rest, target in zip(inputs, kwargs, outputs)]
        teacher = outputs
        if student is not None:
            student_calls, _ = _attention_calls(layer, attention, _batches(student, kwargs), run_all=False)
            calls = [(x, rest, target) for (x, rest, _), (_, _, target) in zip(student_calls, teacher_calls)]
        else:
            calls = teacher_calls
        state = visit(
            LayerCalibration(
                index,
                attention,
                calls,
                blocks,
                *_statistics(attention, calls, calibration.value_moment),  # moment, mean, tokens, attended
                rotary_pairs(hd, rotary, arch.rotary_interleaved),
                rotary,
                key_norm,
                _layer_factory(checkpoint, template, layer, index, device),
                projections,
                arch.attention_module,
            )
        )
        if student is not None:
            if state is not None:
                attention.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
            _, student = _attention_calls(layer, attention, _batches(student, kwargs), run_all=True)
        del layer, attention, calls, blocks


def _batches(hidden: list[torch.Tensor], kwargs: list[dict[str, Any]]) -> list[Batch]:
    return [Batch(state, rest) for state, rest in zip(hidden, kwargs)]


def _layer_factory(checkpoint: Checkpoint, template: Any, source: Any, index: int, device: str) -> Callable[[int], Any]:
    """kv heads -> a copy of the source decoder layer with a freshly built attention of that kv count."""
    attention_name = checkpoint.architecture.attention_module
    kept = {k: v for k, v in source.state_dict().items() if not k.startswith(attention_name + ".")}

    def make(kv_heads: int) -> Any:
        with torch.device(device):
            layer = type(template)(layer_config(checkpoint, kv_heads), index)
        layer.load_state_dict(kept, strict=False)
        return layer.eval().float()

    return make
