"""`gqa-convert tokenize`: a corpus tokenized once, in parallel, into a token folder (shards and a
manifest) that `uptrain --data` reads directly.

The work is done in a staging folder beside the target (`.NAME.partial`) and renamed at the end, so
the target appears whole or not at all. Each unit's shard is written atomically with a record beside
it; a run that is killed leaves its finished units, and a rerun of the same job (same data, tokenizer
and settings) picks them up and finishes the rest. The manifest is written last.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gqa_convert.data.cuts import PIECE_BYTES
from gqa_convert.data.manifest import (
    FORMAT_VERSION,
    MANIFEST,
    TokenizerInfo,
    build_manifest,
    tokenizer_info,
    write_json_atomic,
)
from gqa_convert.data.run_units import run_units
from gqa_convert.data.text import check_data
from gqa_convert.data.units import (
    Columns,
    WorkUnit,
    auto_unit_bytes,
    corpus_bytes,
    corpus_identity,
    plan_units,
    source_signature,
)
from gqa_convert.data.worker import ShardJob, finished_record
from gqa_convert.errors import GQAConvertError
from gqa_convert.io.output import guard_output
from gqa_convert.io.sources import load_tokenizer
from gqa_convert.options import Options, option
from gqa_convert.units import parse_tokens

JOB_FILE = "job.json"
# texts on which the bare fast tokenizer must give the ids transformers gives (no Python-side steps)
_PROBES = (
    "Hello world! It's 2024.",
    "  two spaces\n\nA paragraph\r\n",
    "naïve café — 東京 😀",
    "def f(x):\n\treturn x**2",
)


@dataclass(frozen=True, kw_only=True)
class TokenizeOptions(Options):
    """What `gqa-convert tokenize` takes besides DATA and OUT; checked when built."""

    tokenizer: str = option(help="a model folder or .gguf file whose tokenizer to use")
    num_proc: int | None = option(None, help="worker processes (default: every core)", min=1)
    text_column: str = option("text", help="text column of table data")
    data_config: str | None = option(None, help="Hub dataset configuration")
    split: str = option("train", help="Hub dataset split")
    max_tokens: int | None = option(
        None, help="stop once the units, in order, hold this many tokens (e.g. 2B)", parse=parse_tokens, min=1
    )
    unit_bytes: int | None = option(None, help="size of a work unit (default: from the corpus size)", cli=False, min=1)
    force: bool = option(False, help="replace a non-empty OUT, or restart an unfinished run of another job")
    progress: bool = option(True, help="show progress on stderr", cli=False)

    def check(self) -> None:
        if self.unit_bytes is not None and self.unit_bytes % PIECE_BYTES:
            raise GQAConvertError(f"unit_bytes must be a positive multiple of {PIECE_BYTES}")

    @property
    def columns(self) -> Columns:
        return Columns(self.text_column, self.data_config, self.split)


def describe_job(data: str, info: TokenizerInfo, options: TokenizeOptions) -> dict[str, Any]:
    """Everything the tokens depend on; equal jobs give equal shards."""
    unit_bytes = options.unit_bytes or auto_unit_bytes(corpus_bytes(data))
    return {
        "format_version": FORMAT_VERSION,
        "source": corpus_identity(data, options.columns),
        "tokenizer": info.identity["fingerprint"],
        "max_tokens": options.max_tokens,
        "unit_bytes": unit_bytes,
    }


def check_backend_matches(info: TokenizerInfo) -> None:
    """Workers encode with the bare fast tokenizer: refuse a tokenizer whose Python wrapper changes
    the ids (it would give other tokens than the model sees in transformers)."""
    from tokenizers import Tokenizer

    bare, tokenizer = Tokenizer.from_str(info.serialized), info.tokenizer
    for text in _PROBES:
        if bare.encode(text, add_special_tokens=False).ids != tokenizer(text, add_special_tokens=False)["input_ids"]:
            raise GQAConvertError(
                f"the tokenizer {tokenizer.name_or_path} changes texts in Python before its fast tokenizer: "
                "it cannot be used for parallel tokenization"
            )


def job_fingerprint(job: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(job, sort_keys=True).encode()).hexdigest()[:16]


def staging_of(final: Path) -> Path:
    return final.parent / f".{final.name.lstrip('.')}.partial"


def finished_manifest(final: Path, job: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of `final` when it holds this very job, finished."""
    path = final / MANIFEST
    if not path.is_file():
        return None
    manifest = json.loads(path.read_text())
    return manifest if manifest.get("job") == job else None


@contextlib.contextmanager
def _staging_for(staging: Path, job: dict[str, Any], force: bool) -> Iterator[None]:
    """The staging folder, locked against a second run: fresh, or the one an interrupted run of the
    same job left (resumed). Another job's unfinished folder is cleared only with force."""
    if staging.exists() and not (staging / JOB_FILE).is_file() and any(p.name != ".lock" for p in staging.iterdir()):
        raise GQAConvertError(f"{staging} exists and was not written by gqa-convert tokenize: move it away")
    staging.mkdir(parents=True, exist_ok=True)
    with open(staging / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise GQAConvertError(f"another tokenization is writing {staging}: wait for it to end") from None
        job_file = staging / JOB_FILE
        if job_file.is_file() and json.loads(job_file.read_text()) != job:
            if not force:
                raise GQAConvertError(
                    f"{staging} holds an unfinished tokenization of other data or settings: pass --force to start again"
                )
            for path in staging.iterdir():
                if path.name != ".lock":
                    path.unlink()
        write_json_atomic(job_file, job)
        yield


def _finalize(staging: Path, final: Path, manifest: dict[str, Any]) -> None:
    """Keep only the listed shards, write the manifest last, and rename the folder into place."""
    kept = {record["file"] for record in manifest["shards"]}
    for path in staging.iterdir():
        if path.name != MANIFEST and path.name not in kept:
            path.unlink()
    write_json_atomic(staging / MANIFEST, manifest)
    if final.exists():  # replaced (the caller checked it may be)
        trash = final.parent / f".{final.name.lstrip('.')}.old"
        shutil.rmtree(trash, ignore_errors=True)
        final.rename(trash)
        staging.rename(final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        final.parent.mkdir(parents=True, exist_ok=True)
        staging.rename(final)


def _prefix(units: list[WorkUnit], records: dict[int, dict], max_tokens: int | None) -> list[WorkUnit] | None:
    """The units the manifest lists: all, or the shortest run from the first that holds max_tokens;
    None while a unit of that run is not done."""
    total = 0
    for position, unit in enumerate(units):
        if unit.index not in records:
            return None
        total += records[unit.index]["tokens"]
        if max_tokens is not None and total >= max_tokens:
            return units[: position + 1]
    return units


def write_token_folder(
    data: str, final: Path, info: TokenizerInfo, options: TokenizeOptions, job: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Tokenize `data` into the token folder `final` (replacing it if it exists: the caller decides
    whether it may), resuming an interrupted run of the same job. Returns the manifest, with the
    run's seconds and the units an earlier run had finished (resumed_units)."""
    started = time.perf_counter()
    job = job or describe_job(data, info, options)
    units = plan_units(data, options.columns, job["unit_bytes"])
    check_backend_matches(info)
    staging = staging_of(final)
    with _staging_for(staging, job, options.force):
        try:
            records = {u.index: r for u in units if (r := finished_record(staging, u.index, info.dtype.itemsize))}
            resumed = len(records)
            shard_job = ShardJob(
                str(staging), info.serialized, info.identity["eos_token_id"], info.dtype.name, options.columns
            )
            todo = [unit for unit in units if unit.index not in records]
            enough = lambda: _prefix(units, records, options.max_tokens) is not None  # noqa: E731
            run_units(todo, shard_job, records, options.num_proc, options.progress, enough)
        except GQAConvertError:
            shutil.rmtree(staging, ignore_errors=True)  # bad input: a rerun with fixed data is another job
            raise
        listed = _prefix(units, records, options.max_tokens)
        assert listed is not None, "every unit of the listed run is done"
        source = {**source_signature(data, options.columns), "units": len(units), "units_used": len(listed)}
        shards = [records[unit.index] for unit in listed]
        manifest = build_manifest(
            shards, info.identity, info.dtype.name, source, max_tokens=options.max_tokens, job=job
        )
        _finalize(staging, final, manifest)
    return {**manifest, "seconds": round(time.perf_counter() - started, 3), "resumed_units": resumed}


def _check_paths(data: str, out: Path, options: TokenizeOptions) -> None:
    guard_output(out, inputs=[data, options.tokenizer], force=options.force)


def tokenize(data: str, out: str | Path, options: TokenizeOptions) -> dict[str, Any]:
    """Library entry point of `gqa-convert tokenize`: DATA tokenized into the token folder OUT.
    A rerun of a finished job returns its manifest; of an interrupted one, finishes it."""
    out = Path(out).resolve()
    check_data(data)
    info = tokenizer_info(load_tokenizer(options.tokenizer))
    job = describe_job(data, info, options)
    manifest = finished_manifest(out, job)
    if manifest is not None:
        return manifest
    _check_paths(data, out, options)
    return write_token_folder(data, out, info, options, job)
