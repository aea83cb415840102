"""The residual streams a calibration runs through the layers, one decoder layer on the device at a time.

Two streams: the source model's (the teacher) and, with sequential calibration, the converted model's
(the student: GPTQ-style, each layer is calibrated on the inputs the already merged layers before it
produce, so it learns to correct what they lost). Per layer, `collect` gives the statistics: the
teacher's attention outputs (and layer outputs) are the targets, the student's attention inputs give
the moments. The caller merges the layer, then `advance` runs the student stream through the merged
layer (its attention weights in the source's layout: merged kv heads repeated to every member of their
group, the same function as the merged layer). The caller's loop:

    stream = CalibrationStream(checkpoint, ids, device="cpu", sequential=True, attended="per-head")
    for index in range(stream.num_layers):
        statistics = stream.collect(index)
        state = ...  # merge the layer from `statistics`
        stream.advance(state)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from gqa_convert.calibration.model import (
    Batch,
    first_layer_inputs,
    layer_config,
    layer_template,
    layer_types,
    load_layer,
)
from gqa_convert.calibration.statistics import ATTENDED_MOMENTS, AttentionCall, LayerStatistics, moments
from gqa_convert.io.sources import Checkpoint

BATCH_SIZE = 4  # calibration windows per forward


class _Caught(Exception):
    pass


class CalibrationStream:
    """The teacher's (and the student's) inputs to the next layer; see the module docstring."""

    def __init__(self, checkpoint: Checkpoint, ids: torch.Tensor, *, device: str, sequential: bool, attended: str):
        assert attended in ATTENDED_MOMENTS, attended
        self.checkpoint, self.device, self.attended = checkpoint, device, attended
        hidden, self._kwargs_by_type = first_layer_inputs(checkpoint, ids, device, BATCH_SIZE)
        self._types = layer_types(checkpoint)
        self._teacher: list[torch.Tensor] = hidden
        self._student: list[torch.Tensor] | None = hidden if sequential else None
        self._template = layer_template(checkpoint)
        arch = checkpoint.architecture
        self._projections = {role: name.split(".", 1)[1] for role, name in (arch.projections or {}).items()}
        self._open: tuple[int, Any, list[torch.Tensor]] | None = None  # the layer collected, not yet advanced
        self._next = 0

    @property
    def num_layers(self) -> int:
        return int(self.checkpoint.config.num_hidden_layers)

    def collect(self, index: int) -> LayerStatistics:
        """Layer `index`'s statistics (layers in order, each advanced before the next is collected)."""
        assert self._open is None and index == self._next, (index, self._next)
        kwargs = self._kwargs_by_type[self._types[index]]
        layer = load_layer(self.checkpoint, index, self.device, self._template)
        attention = getattr(layer, self.checkpoint.architecture.attention_module)
        teacher_calls, outputs = _attention_calls(layer, attention, _batches(self._teacher, kwargs), run_all=True)
        inputs = self._student if self._student is not None else self._teacher
        blocks = tuple((x, rest, target) for x, rest, target in zip(inputs, kwargs, outputs))
        if self._student is not None:
            student_calls, _ = _attention_calls(layer, attention, _batches(self._student, kwargs), run_all=False)
            calls = tuple((x, rest, target) for (x, rest, _), (_, _, target) in zip(student_calls, teacher_calls))
        else:
            calls = tuple(teacher_calls)
        self._open = (index, layer, outputs)
        return LayerStatistics(
            index,
            attention,
            self._projections,
            self.checkpoint.architecture.attention_module,
            calls,
            blocks,
            *moments(attention, calls, self.attended),
            _layer_factory(self.checkpoint, self._template, layer, index, self.device),
        )

    def advance(self, state: dict[str, torch.Tensor] | None) -> None:
        """Move past the layer collected last: the teacher's stream through the source layer, the
        student's through the layer with `state` (the merged attention; None: the source's) loaded."""
        assert self._open is not None
        index, layer, outputs = self._open
        self._teacher = outputs
        if self._student is not None:
            attention = getattr(layer, self.checkpoint.architecture.attention_module)
            if state is not None:
                attention.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
            kwargs = self._kwargs_by_type[self._types[index]]
            _, self._student = _attention_calls(layer, attention, _batches(self._student, kwargs), run_all=True)
        self._open, self._next = None, index + 1


def _attention_calls(
    layer: Any, attention: Any, batches: list[Batch], run_all: bool
) -> tuple[list[AttentionCall], list[torch.Tensor]]:
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
