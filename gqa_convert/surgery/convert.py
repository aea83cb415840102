"""pool (MHA/GQA -> fewer kv heads) and expand (GQA -> exact MHA), streamed one layer at a time.

Phases: open the source and validate the request; (calibrated recipes) compute per-layer plans and
merged tensors; plan every output tensor on meta tensors; write the tensors into a staged folder
(attention tensors one layer at a time, the rest copied byte for byte); write config, tokenizer,
provenance and model card; rename the folder into place.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

from gqa_convert.arch import check_seq_len, head_dim_of, kv_cache_bytes_per_token, valid_kv_heads, write_kv_heads
from gqa_convert.calibration.id_file import is_id_file
from gqa_convert.data.text import check_data
from gqa_convert.errors import GQAConvertError
from gqa_convert.io.output import guard_output, output_lock, staged_output, work_folder
from gqa_convert.io.portable import portable_config
from gqa_convert.io.provenance import new_record, write_model_card, write_record
from gqa_convert.io.side_files import copy_side_files, write_config
from gqa_convert.io.sources import Checkpoint, open_checkpoint
from gqa_convert.io.writer import ShardedWriter, TensorSpec
from gqa_convert.surgery.calibrated import calibrate_layers
from gqa_convert.surgery.options import ConversionOptions, ExpandOptions, PoolOptions
from gqa_convert.surgery.plan import HeadPlan, contiguous_groups, expand_groups
from gqa_convert.surgery.stream import Source, cast, compute, plan_outputs, units
from gqa_convert.units import torch_dtype

KEPT_FOLDER = "calibration"  # in OUT: the text the model wrote for its own calibration


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


def pool(source: str | Path, out: str | Path, options: PoolOptions) -> Conversion:
    """Merge the kv heads of `source` into `options.kv_heads` groups by the options' recipe and write a
    transformers folder at `out`. A calibrated recipe reads the calibration text (of the source's domain)."""
    for data in options.calib_data:  # before OUT is touched
        if not is_id_file(data):
            check_data(data)
    with _opened_for_output(source, Path(out), options) as checkpoint:
        options = options.for_architecture(checkpoint.architecture)
        recipe = options.resolved_recipe
        text = options.calibration_text if recipe.calibrated else None
        plan = _pool_plan(checkpoint, options)
        details: dict[str, Any] = {"operation": "pool", "method": recipe.method, "grouping": recipe.grouping}
        details.update(recipe=recipe.as_dict(), seed=options.seed)
        if options.recipe_file:
            details["recipe_file"] = options.recipe_file
        if text is None:
            return _convert(checkpoint, Path(out), Source(checkpoint, plan, {}, {}), options, details)
        check_seq_len(text.seq_len, checkpoint.config, flag="--calib-seq-len")
        device = options.calibration_device
        with work_folder(Path(out), "calib") as workdir:
            kept = workdir / KEPT_FOLDER  # the model's own calibration text, if it writes one
            text = dataclasses.replace(text, device=device, keep=kept)
            layers = calibrate_layers(checkpoint, plan, recipe, text, device, workdir)
            details["calibration"] = {"data": list(text.data), "text_column": text.text_column, "device": device}
            details["calibration"]["tokens_used"] = layers.tokens
            if kept.is_dir():
                details["calibration"]["kept"] = f"{KEPT_FOLDER}/"
            source_plan = Source(checkpoint, plan, layers.plans, layers.overrides)
            return _convert(checkpoint, Path(out), source_plan, options, details, kept if kept.is_dir() else None)


def expand(source: str | Path, out: str | Path, options: ExpandOptions | None = None) -> Conversion:
    """Exact GQA/MQA -> MHA: every query head gets a copy of the kv head it reads."""
    options = options or ExpandOptions()
    with _opened_for_output(source, Path(out), options) as checkpoint:
        num_heads, old_kv = int(checkpoint.config.num_attention_heads), checkpoint.kv_heads()
        if old_kv == num_heads:
            warnings.warn("the source is already MHA: expand writes an identical copy", stacklevel=2)
        plan = HeadPlan(num_heads, old_kv, expand_groups(old_kv, num_heads), head_dim_of(checkpoint.config))
        return _convert(checkpoint, Path(out), Source(checkpoint, plan, {}, {}), options, {"operation": "expand"})


@contextlib.contextmanager
def _opened_for_output(source: str | Path, out: Path, options: ConversionOptions) -> Iterator[Checkpoint]:
    """OUT checked (before any slow work) and held for this run, then the source opened and checked."""
    inputs = options.inputs if isinstance(options, PoolOptions) else ()
    guard_output(out, inputs=[source, *inputs], force=options.force)
    with output_lock(out):
        yield open_checkpoint(source, revision=options.revision, allow_pickle=options.allow_pickle)


def _pool_plan(checkpoint: Checkpoint, options: PoolOptions) -> HeadPlan:
    num_heads, old_kv = int(checkpoint.config.num_attention_heads), checkpoint.kv_heads()
    valid = valid_kv_heads(old_kv)
    if options.kv_heads not in valid:
        origin = "MHA" if old_kv == num_heads else f"GQA with {old_kv} kv heads"
        raise GQAConvertError(
            f"--kv-heads {options.kv_heads} is not possible for this {origin} model ({num_heads} query heads): "
            f"choose one of {', '.join(map(str, valid))}"
        )
    recipe = options.resolved_recipe
    if options.kv_heads == old_kv:
        effect = (
            f"every kv head is redrawn (recipe {recipe.name}): the trained K/V weights are replaced by fresh ones"
            if recipe.method == "random"
            else "nothing is merged (every group is one head)"
        )
        warnings.warn(f"--kv-heads {old_kv} is the model's current kv head count: {effect}", stacklevel=3)
    return HeadPlan(
        num_heads=num_heads,
        old_kv=old_kv,
        groups=contiguous_groups(old_kv, options.kv_heads),
        head_dim=head_dim_of(checkpoint.config),
        merge=recipe.merge_method.merge,
        seed=options.seed,
        init_std=float(getattr(checkpoint.config, "initializer_range", 0.02) or 0.02),
    )


def _progress() -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn())


def _write_tensors(
    source: Source, staging: Path, dtype: torch.dtype | None, max_shard_bytes: int, label: str
) -> list[str]:
    stream = units(source.checkpoint)
    specs = plan_outputs(source, stream, dtype)
    writer = ShardedWriter(staging, specs, max_shard_bytes)
    with _progress() as progress:
        task = progress.add_task(label, total=sum(spec.nbytes for spec in specs))
        for unit in stream:
            for name, tensor in compute(source, unit, dtype):
                progress.advance(task, writer.next_spec().nbytes)
                if tensor is None and writer.write_raw(
                    name, lambda handle, n=name: source.checkpoint.copy_raw(n, handle)
                ):
                    continue  # copied byte for byte by the kernel
                writer.write(name, tensor if tensor is not None else cast(source.checkpoint.get(name), dtype))
    return writer.finish(), specs


def _convert(
    checkpoint: Checkpoint,
    out: Path,
    source: Source,
    options: ConversionOptions,
    details: dict[str, Any],
    kept: Path | None = None,
) -> Conversion:
    dtype = torch_dtype(options.dtype)
    plan = source.plan
    with staged_output(out, options.force) as staging:
        label = f"{details['operation']} -> {out.name}"
        files, specs = _write_tensors(source, staging, dtype, options.max_shard_bytes, label)
        write_config(staging, _output_config(checkpoint, plan.new_kv, dtype or _main_float_dtype(specs)))
        copy_side_files(checkpoint, staging)
        if kept is not None:  # beside the provenance; copied file by file so modes follow the umask
            shutil.copytree(kept, staging / KEPT_FOLDER, copy_function=shutil.copyfile)
        before = kv_cache_bytes_per_token(checkpoint.config, plan.old_kv)
        after = kv_cache_bytes_per_token(checkpoint.config, plan.new_kv)
        details = {**details, "groups": _groups_record(source, details), "kv_heads_before": plan.old_kv}
        details.update(kv_heads_after=plan.new_kv, num_attention_heads=plan.num_heads, dtype=options.dtype)
        write_record(staging, new_record(checkpoint.source, details))
        write_model_card(staging, checkpoint.source, details, before, after, title=out.name)
    return Conversion(out.resolve(), plan.old_kv, plan.new_kv, plan.num_heads, before, after, tuple(files))


def _groups_record(source: Source, details: dict[str, Any]) -> Any:
    """The groups for the provenance: one list, or per layer where a grouping chose them per layer."""
    if source.layer_plans and details.get("grouping") != "contiguous":
        return {layer: [list(g) for g in p.groups] for layer, p in sorted(source.layer_plans.items())}
    return [list(g) for g in source.plan.groups]


def _main_float_dtype(specs: list[TensorSpec]) -> torch.dtype | None:
    """The floating dtype holding most bytes of the output (what the config should declare)."""
    by_bytes: dict[torch.dtype, int] = {}
    for spec in specs:
        if spec.dtype.is_floating_point:
            by_bytes[spec.dtype] = by_bytes.get(spec.dtype, 0) + spec.nbytes
    return max(by_bytes, key=by_bytes.__getitem__) if by_bytes else None


def _output_config(checkpoint: Checkpoint, new_kv: int, dtype: torch.dtype | None) -> dict[str, Any]:
    """The source's config with the new kv count and the dtype written, readable by every client."""
    config_dict = dict(checkpoint.config_dict)
    write_kv_heads(config_dict, checkpoint.config, checkpoint.architecture, new_kv)
    if dtype is not None:
        name = str(dtype).removeprefix("torch.")
        config_dict["dtype"] = name
        if "torch_dtype" in config_dict:
            config_dict["torch_dtype"] = name
    return portable_config(config_dict)
