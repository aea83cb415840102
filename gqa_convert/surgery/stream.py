"""The tensor stream of a conversion: the source's tensors in storage order, each layer's attention
tensors as one unit, and for every unit its output tensors (computed, or passed through for a byte
copy). Run on meta tensors first, it gives every output shape before anything is read."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from gqa_convert.arch import KvTensor, Layout
from gqa_convert.errors import GQAConvertError
from gqa_convert.io.sources import Checkpoint
from gqa_convert.io.writer import TensorSpec
from gqa_convert.surgery.layouts import permute_query_tensor, regroup_per_head, regroup_tensor
from gqa_convert.surgery.plan import HeadPlan


@dataclass(frozen=True)
class Unit:
    """One step of the stream: a pass-through tensor, or every attention tensor of one layer."""

    names: tuple[str, ...]
    layer: int | None


@dataclass
class Source:
    """The checkpoint, plus what a calibrated pass decided: per-layer plans and merged tensors."""

    checkpoint: Checkpoint
    plan: HeadPlan  # for every layer without a plan of its own
    layer_plans: dict[int, HeadPlan]
    overrides: dict[str, Path]  # tensor name -> the file holding its merged value

    def get(self, name: str) -> torch.Tensor:
        if name in self.overrides:
            with safe_open(self.overrides[name], framework="pt") as handle:
                return handle.get_tensor(name)
        return self.checkpoint.get(name)

    def plan_for(self, layer: int | None) -> HeadPlan:
        return self.layer_plans.get(layer, self.plan) if layer is not None else self.plan


def units(checkpoint: Checkpoint) -> list[Unit]:
    """Storage order; a layer's attention tensors form one unit where the first of them stands."""
    result: list[Unit] = []
    layer_units: dict[int, int] = {}
    layer_names: dict[int, list[str]] = defaultdict(list)
    arch = checkpoint.architecture
    for name, layer, suffix in checkpoint.layer_tensors():
        in_attention = arch.kv_tensor_for(suffix) is not None or arch.query_tensor_for(suffix) is not None
        if layer is not None and in_attention:
            layer_names[layer].append(name)
            if layer not in layer_units:
                layer_units[layer] = len(result)
                result.append(Unit((), layer))
        else:
            result.append(Unit((name,), None))
    for layer, index in layer_units.items():
        result[index] = Unit(tuple(layer_names[layer]), layer)
    return result


def cast_dtype(source: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    return target if target is not None and source.is_floating_point else source


def cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(cast_dtype(tensor.dtype, dtype))


def compute(
    source: Source, unit: Unit, dtype: torch.dtype | None, meta: bool = False
) -> Iterator[tuple[str, torch.Tensor | None]]:
    """The unit's output tensors; None for a pass-through tensor that may be copied byte for byte."""
    checkpoint = source.checkpoint

    def load(name: str) -> torch.Tensor:
        info = checkpoint.tensors[name]
        return torch.empty(info.shape, dtype=info.dtype, device="meta") if meta else source.get(name)

    if unit.layer is None:
        (name,) = unit.names
        info = checkpoint.tensors[name]
        yield name, cast(load(name), dtype) if meta or cast_dtype(info.dtype, dtype) != info.dtype else None
        return
    yield from _attention_layer(source, unit, dtype, meta, load)


def _attention_layer(
    source: Source, unit: Unit, dtype: torch.dtype | None, meta: bool, load
) -> Iterator[tuple[str, torch.Tensor | None]]:
    checkpoint, plan = source.checkpoint, source.plan_for(unit.layer)
    arch = checkpoint.architecture
    prefix = arch.layer_prefix.format(layer=unit.layer)
    per_head: dict[KvTensor, dict[int, str]] = defaultdict(dict)
    for name in unit.names:
        suffix = name[len(prefix) :]
        match = arch.kv_tensor_for(suffix)
        if match is None:  # a query-side tensor: only a query permutation changes it
            info = checkpoint.tensors[name]
            unchanged = plan.query_order is None and cast_dtype(info.dtype, dtype) == info.dtype
            if not meta and unchanged and name not in source.overrides:
                yield name, None
                continue
            query = arch.query_tensor_for(suffix)
            assert query is not None
            yield name, cast(permute_query_tensor(load(name), query.dim, plan.num_heads, plan.query_order), dtype)
        elif match[0].layout == Layout.PER_HEAD:
            per_head[match[0]][match[1]] = name
        elif name in source.overrides and not meta:  # merged by a calibrated method, in group order
            yield name, cast(load(name), dtype)
        else:
            yield name, cast(regroup_tensor(match[0], load(name), plan, name), dtype)
    for entry, by_head in per_head.items():
        if sorted(by_head) != list(range(plan.old_kv)):
            raise GQAConvertError(
                f"layer {unit.layer}: expected {plan.old_kv} tensors {entry.suffix}, "
                f"found heads {sorted(by_head)}: the checkpoint does not match its config"
            )
        template = prefix + entry.suffix
        new = regroup_per_head(entry, [load(by_head[h]) for h in range(plan.old_kv)], plan, template)
        for head, tensor in enumerate(new):
            yield template.format(head=head), cast(tensor, dtype)


def plan_outputs(source: Source, stream: list[Unit], dtype: torch.dtype | None) -> list[TensorSpec]:
    """Every output tensor's name, shape and dtype, computed on meta tensors (no data is read)."""
    check_kv_shapes(source.checkpoint, source.plan)
    specs = []
    for unit in stream:
        try:
            for name, tensor in compute(source, unit, dtype, meta=True):
                assert tensor is not None
                specs.append(TensorSpec(name, tuple(tensor.shape), tensor.dtype))
        except RuntimeError as error:  # a reshape that does not fit: config and weights disagree
            raise GQAConvertError(f"layer {unit.layer}: tensor shapes do not match the config ({error})") from None
    return specs


def check_kv_shapes(checkpoint: Checkpoint, plan: HeadPlan) -> None:
    """Config and weights must agree before anything is written (head_dim, kv count)."""
    arch = checkpoint.architecture
    prefix = arch.layer_prefix.format(layer=0)
    for entry in arch.kv_tensors:
        info = checkpoint.tensors.get(prefix + entry.suffix)
        if info is None or entry.layout == Layout.PER_HEAD:
            continue
        expected = entry.expected_rows(plan.num_heads, plan.old_kv, plan.head_dim)
        rows = entry.rows_of(info.shape)
        if rows != expected:
            raise GQAConvertError(
                f"{info.name} has {rows} rows but the config implies {expected} "
                f"({plan.old_kv} kv heads x head_dim {plan.head_dim}): the checkpoint does not match its config"
            )
