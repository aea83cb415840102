"""The token folders a run reads. Data given as a token folder (`gqa-convert tokenize`) is read as it
is, once its tokenizer is checked against the model's. Raw data is tokenized once for the whole job,
by machine rank 0 only, with the parallel tokenizer: beside OUT first (bad data leaves OUT as it was),
then moved to OUT/data/<fingerprint>; the other machines wait for its manifest. Only rank 0 ever
replaces OUT (--force)."""

from __future__ import annotations

import os
import shutil
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
from gqa_convert.data.tokens import tokenize_head
from gqa_convert.errors import GQAConvertError
from gqa_convert.io.output import clear_output_folder
from gqa_convert.io.sources import model_config
from gqa_convert.io.vocabulary import config_vocab_size
from gqa_convert.train.settings import TrainSettings

POLL_S = 2.0
_RAW_ONLY = {"text_column": "text", "data_config": None, "split": "train"}  # settings of raw data only


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
    data: str, settings: TrainSettings, info: TokenizerInfo, out: Path, min_tokens: int, max_tokens: int, head: bool
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
        check_token_ids(data, manifest, config_vocab_size(model_config(settings.model)), settings.model)
        folder = Path(data).resolve()
        if settings.force and not settings.resume and out in folder.parents:
            raise GQAConvertError(f"{data} is inside {out}, which --force replaces: move it out of {out} first")
        check_count(manifest, RunData(data, folder, min_tokens, None), settings)
        return RunData(data, folder, min_tokens, None)
    job = {**describe_job(data, info, _options(settings, max_tokens)), "head": head}
    return RunData(data, out / "data" / job_fingerprint(job), min_tokens, max_tokens, job, head)


def ready_folder(out: Path, item: RunData) -> Path:
    """Where machine rank 0 builds a token folder before moving it into OUT."""
    return out.parent / f".{out.name}.data-{item.folder.name}"


def check_count(manifest: dict[str, Any], item: RunData, settings: TrainSettings) -> None:
    if manifest["tokens"] < item.min_tokens:
        raise GQAConvertError(
            f"{item.data} holds {manifest['tokens']} tokens, fewer than one block of --seq-len {settings.seq_len}: "
            "give more text or lower --seq-len"
            if item.min_tokens == settings.seq_len
            else f"{item.data} holds {manifest['tokens']} tokens: give at least {item.min_tokens}"
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


def make_data(items: list[RunData], settings: TrainSettings, info: TokenizerInfo, out: Path) -> None:
    """Machine rank 0: tokenize what OUT/data lacks (beside OUT), check every folder, replace OUT
    under --force (keeping the token folders this run uses), then make OUT and move the new folders in."""
    moving = [item for item in items if item.raw and not (item.folder / MANIFEST).is_file()]
    try:
        for item in items:
            built = item in moving
            manifest = build(item, settings, info, ready_folder(out, item)) if built else read_manifest(item.folder)
            check_count(manifest, item, settings)
    except GQAConvertError:
        for item in moving:
            shutil.rmtree(ready_folder(out, item), ignore_errors=True)
        raise
    if settings.force and not settings.resume and out.exists():
        kept = [item for item in items if item.raw and item not in moving]
        for item in kept:
            item.folder.rename(ready_folder(out, item))
        clear_output_folder(out)  # only an empty folder or one this tool wrote
        moving += kept
    out.mkdir(parents=True, exist_ok=True)
    for item in moving:
        item.folder.parent.mkdir(parents=True, exist_ok=True)
        ready_folder(out, item).rename(item.folder)


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
