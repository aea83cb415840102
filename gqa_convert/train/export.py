"""The final model, streamed: every rank walks the same tensor list in the same order and gathers each
tensor whole (a collective for sharded tensors); rank 0 casts it to the source's dtype and writes it
through the project's sharded safetensors writer. Memory holds one gathered tensor at a time: rank 0
never builds a state dict. The files are staged in OUT/.export-tmp and moved in at the end, with the
source's config and tokenizer, and last the provenance of the run: a provenance naming the run's
final step says the export is whole (exported())."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch.distributed as dist

from gqa_convert import __version__
from gqa_convert.io.portable import portable_config
from gqa_convert.io.provenance import PROVENANCE_FILE, new_record, read_record, write_record
from gqa_convert.io.side_files import copy_side_files, write_config
from gqa_convert.io.sources import open_checkpoint
from gqa_convert.io.writer import INDEX_NAME, ShardedWriter, TensorSpec
from gqa_convert.report.metrics import METRICS_FILE, last_trained, read_records
from gqa_convert.train.plan import TrainPlan
from gqa_convert.train.strategies import Strategy
from gqa_convert.train.strategies.loading import source_dtype

MAX_SHARD_BYTES = 5 * 10**9
STAGING = ".export-tmp"


def exported(plan: TrainPlan) -> bool:
    """OUT holds this run's final model: weights, and the provenance (moved in last) of its last step."""
    record = read_record(plan.out)
    uptrain = record.get("uptrain") if isinstance(record, dict) else None
    weights = (plan.out / "model.safetensors").is_file() or (plan.out / INDEX_NAME).is_file()
    return weights and isinstance(uptrain, dict) and uptrain.get("steps") == plan.steps


def export_model(strategy: Strategy, plan: TrainPlan, steps: int, tokens: int) -> None:
    """Collective: every rank calls it."""
    settings = plan.settings
    out = Path(settings.out)
    main = dist.get_rank() == 0
    dtype = source_dtype(settings.model)
    tensors = strategy.export_tensors()
    specs = [
        TensorSpec(name, strategy.full_shape(tensor), dtype if tensor.is_floating_point() else tensor.dtype)
        for name, tensor in tensors
    ]
    staging = out / STAGING
    try:
        writer = None
        if main:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir()
            writer = ShardedWriter(staging, specs, MAX_SHARD_BYTES)
        for (_, tensor), spec in zip(tensors, specs):
            full = strategy.gather(tensor)  # every rank, same order
            if writer is not None:
                writer.write(spec.name, full.detach().to("cpu", spec.dtype))
            del full
        if main:
            writer.finish()
            _write_side_files(staging, plan, steps, tokens)
            _move_in(staging, out)
    except BaseException:
        if main:
            shutil.rmtree(staging, ignore_errors=True)
        raise
    dist.barrier()


def _write_side_files(folder: Path, plan: TrainPlan, steps: int, tokens: int) -> None:
    """The source's config (training changes no shape), tokenizer and generation settings, provenance."""
    source = Path(plan.settings.model)
    write_config(folder, portable_config(json.loads((source / "config.json").read_text())))
    copy_side_files(open_checkpoint(source), folder)
    _write_provenance(folder, plan, steps, tokens)


def _move_in(staging: Path, out: Path) -> None:
    (out / PROVENANCE_FILE).unlink(missing_ok=True)  # until the new one is in, no export is whole
    for stale in [*out.glob("model*.safetensors"), out / INDEX_NAME]:
        stale.unlink(missing_ok=True)  # a stale single file beside new shards would break loading
    for file in sorted(staging.iterdir(), key=lambda file: file.name == PROVENANCE_FILE):
        file.replace(out / file.name)
    staging.rmdir()


def _write_provenance(folder: Path, plan: TrainPlan, steps: int, tokens: int) -> None:
    settings = plan.settings
    record = read_record(Path(settings.model)) or new_record(settings.model, {})
    last = last_trained(read_records(Path(settings.out) / METRICS_FILE))
    record["uptrain"] = {
        "version": __version__,
        "model": str(settings.model),
        "arguments": vars(settings),
        "strategy": plan.strategy,
        "processes": plan.world_size,
        "budget": plan.budget_origin,
        "steps": steps,
        "tokens": tokens,
        "final_loss": None if last is None else last["loss"],
    }
    write_record(folder, record)
