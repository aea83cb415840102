"""pool (MHA/GQA -> fewer kv heads) and expand (GQA -> exact MHA), streamed one layer at a time.

Phases: open the source and validate the request; plan every output tensor on meta tensors; write the
tensors into a staged folder (kv-dependent tensors one layer at a time, the rest copied byte for
byte); write config, tokenizer, provenance and model card; rename the folder into place.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import warnings
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from gqa_convert.architectures import PER_HEAD, KvTensor, head_dim_of, write_kv_heads
from gqa_convert.checkpoint import WEIGHT_SUFFIXES, Checkpoint, iter_layer_tensors, open_checkpoint
from gqa_convert.errors import GQAConvertError
from gqa_convert.calibrated import Calibration
from gqa_convert.grouping import GROUPINGS, NEEDS_CALIBRATION
from gqa_convert.merging import CALIBRATED_METHODS, METHODS, merge_mean
from gqa_convert.regroup import (
    HeadPlan, contiguous_groups, expand_groups, permute_query_tensor, regroup_per_head, regroup_tensor,
)  # fmt: skip
from gqa_convert.report import kv_cache_bytes_per_token, write_model_card, write_provenance
from gqa_convert.writer import ShardedWriter, TensorSpec, check_output_folder, parse_size, staged_output

DTYPES = {"auto": None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_OWN_FILES = {"config.json", "README.md", "gqa_convert.json", "model.safetensors.index.json"}


@dataclass(frozen=True)
class Conversion:
    """What was written: returned by pool() and expand() for callers and the CLI's summary."""

    out: Path
    old_kv: int
    new_kv: int
    num_heads: int
    kv_bytes_per_token_before: int
    kv_bytes_per_token_after: int
    files: tuple[str, ...]


@dataclass(frozen=True)
class _Unit:
    """One step of the stream: a pass-through tensor, or every kv-dependent tensor of one layer."""

    names: tuple[str, ...]
    layer: int | None


def valid_kv_heads(num_heads: int, kv_heads: int) -> list[int]:
    """Targets reachable by merging whole kv heads: the divisors of the current kv count."""
    return [g for g in range(1, kv_heads + 1) if kv_heads % g == 0]


def pool(
    source: str | Path,
    out: str | Path,
    kv_heads: int,
    method: str = "mean",
    grouping: str = "contiguous",
    dtype: str = "auto",
    max_shard_size: str = "5GB",
    force: bool = False,
    seed: int = 0,
    revision: str | None = None,
    allow_pickle: bool = False,
    calibration: Calibration | None = None,
) -> Conversion:
    """Merge the kv heads of `source` into `kv_heads` groups and write a transformers folder at `out`.
    `aligned` and `similarity` need `calibration` (text of the source's domain)."""
    methods = {**METHODS, **CALIBRATED_METHODS}
    if method not in methods:
        raise GQAConvertError(f"unknown method '{method}'; choose one of: {', '.join(methods)}")
    if grouping not in GROUPINGS:
        raise GQAConvertError(f"unknown grouping '{grouping}'; choose one of: {', '.join(GROUPINGS)}")
    calibrated = method in CALIBRATED_METHODS or grouping in NEEDS_CALIBRATION
    if calibrated and calibration is None:
        raise GQAConvertError(f"--method {method} --grouping {grouping} needs calibration text: pass --calib-data FILE")
    if not calibrated and calibration is not None:
        warnings.warn("--calib-data is ignored: mean/first/random with contiguous grouping use no calibration",
                      stacklevel=2)  # fmt: skip
    if calibration is not None and calibrated:
        from gqa_convert.data import check_data

        check_data(calibration.data)
    checkpoint = _open_for_output(source, out, force, revision, allow_pickle)
    num_heads, old_kv = int(checkpoint.config.num_attention_heads), checkpoint.kv_heads()
    valid = valid_kv_heads(num_heads, old_kv)
    if kv_heads not in valid:
        origin = "MHA" if old_kv == num_heads else f"GQA with {old_kv} kv heads"
        raise GQAConvertError(
            f"--kv-heads {kv_heads} is not possible for this {origin} model ({num_heads} query heads): "
            f"choose one of {', '.join(map(str, valid))}"
        )
    plan = HeadPlan(
        num_heads=num_heads,
        old_kv=old_kv,
        groups=contiguous_groups(old_kv, kv_heads),
        head_dim=head_dim_of(checkpoint.config),
        merge=METHODS.get(method, merge_mean),  # calibrated methods: mean for what they do not cover
        seed=seed,
        init_std=float(getattr(checkpoint.config, "initializer_range", 0.02) or 0.02),
    )
    details: dict[str, Any] = {"operation": "pool", "method": method, "grouping": grouping, "seed": seed}
    if not calibrated:
        return _convert(checkpoint, Path(out), plan, dtype, max_shard_size, details)
    from gqa_convert.calibrated import calibrate_plans

    Path(out).resolve().parent.mkdir(parents=True, exist_ok=True)
    workdir = Path(tempfile.mkdtemp(prefix=f".{Path(out).name}.calib-", dir=Path(out).resolve().parent))
    try:
        layer_plans, overrides = calibrate_plans(checkpoint, plan, method, grouping, calibration, workdir)
        details["calibration"] = dataclasses.asdict(calibration)
        return _convert(checkpoint, Path(out), plan, dtype, max_shard_size, details, layer_plans, overrides)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def expand(
    source: str | Path,
    out: str | Path,
    dtype: str = "auto",
    max_shard_size: str = "5GB",
    force: bool = False,
    revision: str | None = None,
    allow_pickle: bool = False,
) -> Conversion:
    """Exact GQA/MQA -> MHA: every query head gets a copy of the kv head it reads."""
    checkpoint = _open_for_output(source, out, force, revision, allow_pickle)
    num_heads, old_kv = int(checkpoint.config.num_attention_heads), checkpoint.kv_heads()
    if old_kv == num_heads:
        warnings.warn("the source is already MHA: expand writes an identical copy", stacklevel=2)
    plan = HeadPlan(num_heads, old_kv, expand_groups(old_kv, num_heads), head_dim_of(checkpoint.config))
    return _convert(checkpoint, Path(out), plan, dtype, max_shard_size, {"operation": "expand"})


def _open_for_output(source: str | Path, out: str | Path, force: bool, revision: str | None,
                     allow_pickle: bool) -> Checkpoint:  # fmt: skip
    local = Path(source) if Path(source).exists() else None
    check_output_folder(Path(out), local, force)  # before any slow work
    return open_checkpoint(source, revision=revision, allow_pickle=allow_pickle)


def _convert(checkpoint: Checkpoint, out: Path, plan: HeadPlan, dtype: str, max_shard_size: str,
             details: dict[str, Any], layer_plans: dict[int, HeadPlan] | None = None,
             overrides: dict[str, Path] | None = None) -> Conversion:  # fmt: skip
    if dtype not in DTYPES:
        raise GQAConvertError(f"unknown dtype '{dtype}'; choose one of: {', '.join(DTYPES)}")
    max_shard_bytes = parse_size(max_shard_size)
    units = _units(checkpoint)
    source = _Source(checkpoint, layer_plans or {}, overrides or {})
    specs = _plan(source, units, plan, DTYPES[dtype])
    total = sum(spec.nbytes for spec in specs)
    with staged_output(out) as staging:
        writer = ShardedWriter(staging, specs, max_shard_bytes)
        with _progress() as progress:
            task = progress.add_task(f"{details['operation']} -> {out.name}", total=total)
            for unit in units:
                for name, tensor in _compute(source, unit, plan, DTYPES[dtype]):
                    progress.advance(task, writer.next_spec().nbytes)
                    if tensor is None and writer.write_raw(name, lambda handle, n=name: checkpoint.copy_raw(n, handle)):
                        continue  # copied byte for byte by the kernel
                    writer.write(name, tensor if tensor is not None else _cast(checkpoint.get(name), DTYPES[dtype]))
        files = writer.finish()
        config_dict = _output_config(checkpoint, plan.new_kv, DTYPES[dtype])
        _write_side_files(checkpoint, staging, config_dict)
        before = kv_cache_bytes_per_token(checkpoint.config, plan.old_kv)
        after = kv_cache_bytes_per_token(checkpoint.config, plan.new_kv)
        groups = ({layer: [list(g) for g in p.groups] for layer, p in sorted(layer_plans.items())}
                  if layer_plans and details.get("grouping") != "contiguous" else [list(g) for g in plan.groups])
        details = {**details, "groups": groups, "kv_heads_before": plan.old_kv,
                   "kv_heads_after": plan.new_kv, "num_attention_heads": plan.num_heads, "dtype": dtype}  # fmt: skip
        write_provenance(staging, checkpoint.source, details)
        write_model_card(staging, checkpoint, details, before, after, title=out.name)
    return Conversion(out.resolve(), plan.old_kv, plan.new_kv, plan.num_heads, before, after, tuple(files))


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())


def _units(checkpoint: Checkpoint) -> list[_Unit]:
    """Storage order; a layer's kv-dependent tensors form one unit where the first of them stands."""
    units: list[_Unit] = []
    layer_units: dict[int, int] = {}
    layer_names: dict[int, list[str]] = defaultdict(list)
    arch = checkpoint.architecture
    for name, layer, suffix in iter_layer_tensors(checkpoint):
        in_attention = arch.kv_tensor_for(suffix) is not None or any(q.suffix == suffix for q in arch.query_tensors)
        if layer is not None and in_attention:
            layer_names[layer].append(name)
            if layer not in layer_units:
                layer_units[layer] = len(units)
                units.append(_Unit((), layer))
        else:
            units.append(_Unit((name,), None))
    for layer, index in layer_units.items():
        units[index] = _Unit(tuple(layer_names[layer]), layer)
    return units


@dataclass
class _Source:
    """The checkpoint, plus what a calibrated method decided: per-layer plans and merged tensors."""

    checkpoint: Checkpoint
    layer_plans: dict[int, HeadPlan]
    overrides: dict[str, Path]

    def get(self, name: str) -> torch.Tensor:
        if name in self.overrides:
            from safetensors import safe_open

            with safe_open(self.overrides[name], framework="pt") as handle:
                return handle.get_tensor(name)
        return self.checkpoint.get(name)


def _compute(source: _Source, unit: _Unit, plan: HeadPlan, dtype: torch.dtype | None,
             meta: bool = False) -> Iterator[tuple[str, torch.Tensor | None]]:  # fmt: skip
    """The unit's output tensors; None for a pass-through tensor that may be copied byte for byte."""
    checkpoint = source.checkpoint
    if unit.layer is not None:
        plan = source.layer_plans.get(unit.layer, plan)

    def load(name: str) -> torch.Tensor:
        info = checkpoint.tensors[name]
        return torch.empty(info.shape, dtype=info.dtype, device="meta") if meta else source.get(name)

    if unit.layer is None:
        (name,) = unit.names
        info = checkpoint.tensors[name]
        if meta or _cast_dtype(info.dtype, dtype) != info.dtype:
            yield name, _cast(load(name), dtype)
        else:
            yield name, None
        return
    arch = checkpoint.architecture
    prefix = arch.layer_prefix.format(layer=unit.layer)
    per_head: dict[KvTensor, dict[int, str]] = defaultdict(dict)
    for name in unit.names:
        suffix = name[len(prefix) :]
        match = arch.kv_tensor_for(suffix)
        if match is None:  # a query-side tensor: only a query permutation changes it
            info = checkpoint.tensors[name]
            if not meta and plan.query_order is None and _cast_dtype(info.dtype, dtype) == info.dtype \
                    and name not in source.overrides:  # fmt: skip
                yield name, None
                continue
            dim = next(q.dim for q in arch.query_tensors if q.suffix == suffix)
            yield name, _cast(permute_query_tensor(load(name), dim, plan), dtype)
        elif match[0].layout == PER_HEAD:
            per_head[match[0]][match[1]] = name
        elif name in source.overrides and not meta:  # merged by a calibrated method, in group order
            yield name, _cast(load(name), dtype)
        else:
            yield name, _cast(regroup_tensor(match[0], load(name), plan, name), dtype)
    for entry, by_head in per_head.items():
        if sorted(by_head) != list(range(plan.old_kv)):
            raise GQAConvertError(f"layer {unit.layer}: expected {plan.old_kv} tensors {entry.suffix}, "
                                  f"found heads {sorted(by_head)}: the checkpoint does not match its config")
        template = prefix + entry.suffix
        new = regroup_per_head(entry, [load(by_head[h]) for h in range(plan.old_kv)], plan, template)
        for head, tensor in enumerate(new):
            yield template.format(head=head), _cast(tensor, dtype)


def _cast_dtype(source: torch.dtype, target: torch.dtype | None) -> torch.dtype:
    return target if target is not None and source.is_floating_point else source


def _cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    return tensor.to(_cast_dtype(tensor.dtype, dtype))


def _plan(source: _Source, units: list[_Unit], plan: HeadPlan, dtype: torch.dtype | None) -> list[TensorSpec]:
    """Every output tensor's name, shape and dtype, computed on meta tensors (no data is read)."""
    _check_kv_shapes(source.checkpoint, plan)
    specs = []
    for unit in units:
        try:
            for name, tensor in _compute(source, unit, plan, dtype, meta=True):
                assert tensor is not None
                specs.append(TensorSpec(name, tuple(tensor.shape), tensor.dtype))
        except RuntimeError as error:  # a reshape that does not fit: config and weights disagree
            raise GQAConvertError(f"layer {unit.layer}: tensor shapes do not match the config ({error})") from None
    return specs


def _check_kv_shapes(checkpoint: Checkpoint, plan: HeadPlan) -> None:
    """Config and weights must agree before anything is written (head_dim, kv count)."""
    arch = checkpoint.architecture
    prefix = arch.layer_prefix.format(layer=0)
    for entry in arch.kv_tensors:
        info = checkpoint.tensors.get(prefix + entry.suffix)
        if info is None or entry.layout == PER_HEAD:
            continue
        expected = {
            "rows": plan.old_kv * plan.head_dim,
            "fused_concat": (plan.num_heads + 2 * plan.old_kv) * plan.head_dim,
            "fused_grouped": (plan.num_heads + 2 * plan.old_kv) * plan.head_dim,
        }[entry.layout]
        rows = info.shape[0] * (info.shape[1] if len(info.shape) == 2 and entry.kind == "norm" else 1)
        if rows != expected:
            raise GQAConvertError(
                f"{info.name} has {rows} rows but the config implies {expected} "
                f"({plan.old_kv} kv heads x head_dim {plan.head_dim}): the checkpoint does not match its config"
            )


def _output_config(checkpoint: Checkpoint, new_kv: int, dtype: torch.dtype | None) -> dict[str, Any]:
    config_dict = dict(checkpoint.config_dict)
    write_kv_heads(config_dict, checkpoint.config, checkpoint.architecture, new_kv)
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        config_dict["dtype"] = name
        if "torch_dtype" in config_dict:
            config_dict["torch_dtype"] = name
    return config_dict


def _write_side_files(checkpoint: Checkpoint, staging: Path, config_dict: dict[str, Any]) -> None:
    """config.json, plus the source's tokenizer and other non-weight files."""
    import json

    (staging / "config.json").write_text(json.dumps(config_dict, indent=2, sort_keys=True) + "\n")
    if checkpoint.folder is not None:
        for path in sorted(checkpoint.folder.iterdir()):
            if path.is_file() and path.name not in _OWN_FILES and not path.name.endswith(WEIGHT_SUFFIXES) \
                    and not path.name.endswith(".index.json"):  # fmt: skip
                shutil.copy2(path, staging / path.name)
    if checkpoint.gguf_file is not None:
        from transformers import AutoTokenizer, GenerationConfig

        gguf = Path(checkpoint.gguf_file)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(staging)
        GenerationConfig.from_model_config(checkpoint.config).save_pretrained(staging)
