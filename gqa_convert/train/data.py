"""The token folders a run reads, and the batches each process takes from them.

Data given as a token folder (`gqa-convert tokenize`) is read as it is, once its tokenizer is checked
against the model's. Raw data is tokenized once for the whole job, by machine rank 0 only, with the
parallel tokenizer: beside OUT first (bad data leaves OUT as it was), then moved to
OUT/data/<fingerprint>; the other machines wait for its manifest. Only rank 0 ever replaces OUT (--force).

Ids are checked against the model's vocabulary before any forward pass: the tokenizer against
config.vocab_size, a token folder's recorded largest id, and every batch as it is read (a shard
altered after its manifest was written is named, not fed to the embedding).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from gqa_convert.data.manifest import (
    MANIFEST,
    TokenizerInfo,
    check_token_ids,
    check_tokenizer,
    is_token_folder,
    read_manifest,
)
from gqa_convert.data.tokenize import (
    TokenizeOptions,
    describe_job,
    finished_manifest,
    job_fingerprint,
    staging_of,
    write_token_folder,
)
from gqa_convert.data.tokens import TokenBlocks, tokenize_head
from gqa_convert.errors import GQAConvertError
from gqa_convert.io.output import clear_output_folder
from gqa_convert.train.settings import TrainSettings

POLL_S = 2.0
_RAW_ONLY = {"text_column": "text", "data_config": None, "split": "train"}  # settings of raw data only


class Batches:
    """The blocks each process trains on. Block indices are laid out step-major, then micro-step, then
    rank: disjoint across ranks, and each step trains on the same blocks whatever the split into
    processes and micro-steps, so the data position is a pure function of the step."""

    def __init__(self, folder: str, seq_len: int, seed: int, micro_batch: int, world: int, vocab_size: int) -> None:
        self.folder, self.blocks = folder, TokenBlocks(folder, seq_len, seed)
        self.micro_batch, self.world, self.vocab_size = micro_batch, world, vocab_size

    def read(self, step: int, micro: int, rank: int, grad_accum: int) -> np.ndarray:
        """[micro_batch, seq_len] int64 ids of one micro-step of one process."""
        first = (step * grad_accum * self.world + micro * self.world + rank) * self.micro_batch
        ids = np.stack([self.blocks.block(first + i) for i in range(self.micro_batch)])
        if ids.size and int(ids.max()) >= self.vocab_size:
            raise GQAConvertError(
                f"{self.folder} holds token id {int(ids.max())} (block {first} on), but the model has "
                f"{self.vocab_size} ids: the token folder is damaged or from another tokenizer; tokenize the data again"
            )
        return ids

    def epoch_of(self, block: int) -> int:
        return self.blocks.epoch_of(block)


# ---- the run's token folders ----
@dataclass(frozen=True)
class RunData:
    """One data argument of a run (--data or --eval-data) and the token folder the workers read."""

    data: str
    folder: Path
    min_tokens: int
    max_tokens: int | None  # raw data: tokenize no more (in whole units, or exactly with head)
    job: dict[str, Any] | None = None  # raw data: what its tokens depend on; None for a token folder
    head: bool = False  # raw data tokenized from the start in this process (evaluation data)

    @property
    def raw(self) -> bool:
        return self.job is not None


def _options(settings: TrainSettings, max_tokens: int | None) -> TokenizeOptions:
    return TokenizeOptions(
        tokenizer=settings.model,
        text_column=settings.text_column,
        data_config=settings.data_config,
        split=settings.split,
        max_tokens=max_tokens,
    )


def plan_data(
    data: str,
    settings: TrainSettings,
    info: TokenizerInfo,
    out: Path,
    min_tokens: int,
    max_tokens: int,
    head: bool,
    vocab_size: int,
) -> RunData:
    """Where `data`'s tokens are (a given token folder, checked) or will be (OUT/data/<fingerprint>)."""
    if is_token_folder(data):
        ignored = [
            f"--{name.replace('_', '-')}" for name, default in _RAW_ONLY.items() if getattr(settings, name) != default
        ]
        if ignored:
            warnings.warn(f"{', '.join(ignored)} ignored: {data} is already tokenized", stacklevel=2)
        manifest = read_manifest(data)
        check_tokenizer(manifest, info.tokenizer, data, settings.model)
        check_token_ids(data, manifest, vocab_size, settings.model)
        folder = Path(data).resolve()
        if settings.force and out in folder.parents:
            raise GQAConvertError(f"{data} is inside {out}, which --force replaces: move it out of {out} first")
        check_count(manifest, RunData(data, folder, min_tokens, None), settings)
        return RunData(data, folder, min_tokens, None)
    job = {**describe_job(data, info, _options(settings, max_tokens)), "head": head}
    return RunData(data, out / "data" / job_fingerprint(job), min_tokens, max_tokens, job, head)


def ready_folder(out: Path, item: RunData) -> Path:
    """Where machine rank 0 builds a token folder before moving it into OUT."""
    return out.parent / f".{out.name}.data-{item.folder.name}"


def check_count(manifest: dict[str, Any], item: RunData, settings: TrainSettings) -> None:
    """Training data holds one micro-batch of blocks at least (a batch is built in memory: never more
    blocks than exist); evaluation data its minimum."""
    tokens, seq_len, blocks = manifest["tokens"], settings.seq_len, settings.micro_batch_size
    if tokens >= item.min_tokens:
        return
    if item.min_tokens != seq_len * blocks:
        raise GQAConvertError(f"{item.data} holds {tokens} tokens: give at least {item.min_tokens}")
    if tokens < seq_len:
        raise GQAConvertError(
            f"{item.data} holds {tokens} tokens, fewer than one block of --seq-len {seq_len}: give more text or "
            "lower --seq-len"
        )
    raise GQAConvertError(
        f"{item.data} holds {tokens // seq_len} blocks of --seq-len {seq_len}, fewer than one micro-batch "
        f"(--micro-batch-size {blocks}): lower --micro-batch-size or --seq-len, or give more data"
    )


def build(item: RunData, settings: TrainSettings, info: TokenizerInfo, folder: Path) -> dict[str, Any]:
    """Tokenize raw data into `folder` (resuming an interrupted build of the same job)."""
    assert item.job is not None and item.max_tokens is not None
    manifest = finished_manifest(folder, item.job)
    if manifest is not None:
        return manifest
    options = _options(settings, item.max_tokens)
    if item.head:
        return tokenize_head(item.data, options.columns, info, folder, item.max_tokens, item.job)
    return write_token_folder(item.data, folder, info, options, item.job)


def _finished(item: RunData) -> bool:
    """OUT/data holds this item's tokens, whole."""
    try:
        return finished_manifest(item.folder, item.job) is not None and bool(read_manifest(item.folder))
    except (GQAConvertError, OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def make_data(items: list[RunData], settings: TrainSettings, info: TokenizerInfo, out: Path) -> list[Path]:
    """Machine rank 0: tokenize what OUT/data lacks (beside OUT), check every folder, replace OUT
    under --force (keeping the token folders this run uses), then make OUT and move the new folders in.
    A token folder of OUT/data that is damaged (its manifest unreadable, a shard of another size) is
    tokenized again and replaced. Returns the token folders it moved into OUT."""
    moving = [item for item in items if item.raw and not _finished(item)]
    for item in moving:
        if item.folder.exists():
            warnings.warn(f"{item.folder} is damaged: {item.data} is tokenized again", stacklevel=2)
    try:
        for item in items:
            built = item in moving
            manifest = build(item, settings, info, ready_folder(out, item)) if built else read_manifest(item.folder)
            check_count(manifest, item, settings)
    except BaseException:
        for item in moving:
            shutil.rmtree(ready_folder(out, item), ignore_errors=True)
        raise
    if settings.force and out.exists():
        kept = [item for item in items if item.raw and item not in moving]
        for item in kept:
            item.folder.rename(ready_folder(out, item))
        clear_output_folder(out)  # only an empty folder or one this tool wrote
        moving += kept
    out.mkdir(parents=True, exist_ok=True)
    (out / "checkpoints").mkdir(exist_ok=True)  # a run exists from here on: --resume finds it
    for item in moving:
        item.folder.parent.mkdir(parents=True, exist_ok=True)
        if item.folder.is_dir() and not item.folder.is_symlink():
            shutil.rmtree(item.folder)  # the damaged folder of this very job (named by its fingerprint)
        ready_folder(out, item).rename(item.folder)
    return [item.folder for item in moving]


def _signs_of_progress(out: Path, item: RunData) -> tuple[int, bool]:
    staging = staging_of(ready_folder(out, item))
    return (len(os.listdir(staging)) if staging.is_dir() else -1, ready_folder(out, item).exists())


def wait_for_data(items: list[RunData], settings: TrainSettings, out: Path, rank: int) -> None:
    """A machine of rank > 0: wait until rank 0 has moved every raw data folder into OUT/data; give up
    after --timeout-minutes without any sign of progress from rank 0."""
    for item in items:
        if not item.raw or (item.folder / MANIFEST).is_file():
            continue
        print(f"machine rank {rank}: waiting for machine rank 0 to tokenize {item.data} into {item.folder}", flush=True)
        signs, since = _signs_of_progress(out, item), time.monotonic()
        while not (item.folder / MANIFEST).is_file():
            if (now := _signs_of_progress(out, item)) != signs:
                signs, since = now, time.monotonic()
            elif time.monotonic() - since > settings.timeout_minutes * 60:
                raise GQAConvertError(
                    f"machine rank {rank} waited {settings.timeout_minutes:g} minutes for machine rank 0 to "
                    f"tokenize {item.data} into {item.folder} and saw no progress: OUT must be on a filesystem every "
                    "machine shares; start rank 0 with the same --data, -o and budget, or raise --timeout-minutes"
                )
            time.sleep(POLL_S)
        check_count(read_manifest(item.folder), item, settings)


def dry_run_data(items: list[RunData], settings: TrainSettings, info: TokenizerInfo, out: Path) -> Path:
    """A dry run tokenizes only what its measured step reads, into a temporary folder beside OUT."""
    scratch = Path(tempfile.mkdtemp(prefix=f".{out.name}.dry-run-", dir=out.parent))
    try:
        for item in items:
            if item.raw:
                folder = scratch / item.folder.name
                manifest = build(replace(item, head=True), settings, info, folder)
                check_count(manifest, item, settings)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    return scratch


def prepare_data(
    settings: TrainSettings, info: TokenizerInfo, out: Path, need: int, rank: int, vocab_size: int
) -> tuple[RunData, RunData | None, str | None, list[Path]]:
    """The run's token folders: made (machine rank 0), waited for (the others) or, for a dry run,
    tokenized into a scratch folder (returned third, for the caller to remove); and the folders this
    call moved into OUT."""
    blocks = settings.seq_len * settings.micro_batch_size  # the training data holds one micro-batch
    train = plan_data(settings.data, settings, info, out, blocks, need, False, vocab_size)
    evaluation = None
    if settings.eval_data:
        evaluation = plan_data(settings.eval_data, settings, info, out, 2, settings.eval_tokens, True, vocab_size)
    items = [train] if evaluation is None else [train, evaluation]
    if settings.dry_run:
        scratch = dry_run_data(items, settings, info, out)
        moved = [replace(item, folder=scratch / item.folder.name) if item.raw else item for item in items]
        return moved[0], (moved[1] if evaluation else None), str(scratch), []
    added = []
    if rank == 0:
        added = make_data(items, settings, info, out)
    else:
        wait_for_data(items, settings, out, rank)
    return train, evaluation, None, added
