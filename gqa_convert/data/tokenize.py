"""`gqa-convert tokenize`: a corpus tokenized once, in parallel, into a token folder (shards and a
manifest) that `uptrain --data` reads directly.

The work is done in a staging folder beside the target (`.NAME.partial`) and renamed at the end, so
the target appears whole or not at all. Each unit's shard is written atomically with a record beside
it; a run that is killed leaves its finished units, and a rerun of the same job (same data, tokenizer
and settings) picks them up and finishes the rest. The manifest is written last. Bad data (a row
that is not text, invalid UTF-8, a file changed while it is read, a corpus with no text at all) fails
with one line and leaves nothing; an OSError keeps the finished units for a rerun (data.staging).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gqa_convert.data.cuts import PIECE_BYTES
from gqa_convert.data.files import changed_error
from gqa_convert.data.manifest import (
    FORMAT_VERSION,
    TokenizerInfo,
    build_manifest,
    is_token_folder,
    read_manifest,
    tokenizer_info,
)
from gqa_convert.data.manifest_schema import DamagedTokenFolder
from gqa_convert.data.run_units import run_units
from gqa_convert.data.staging import finalize, io_failure, remove_temporary, staging_for, staging_of
from gqa_convert.data.text import check_data
from gqa_convert.data.units import (
    Columns,
    WorkUnit,
    auto_unit_bytes,
    corpus_bytes,
    corpus_identity,
    is_local,
    plan_units,
    source_signature,
)
from gqa_convert.data.worker import ShardJob, UnitIOError, finished_record
from gqa_convert.errors import GQAConvertError
from gqa_convert.io.output import guard_output
from gqa_convert.io.sources import load_tokenizer
from gqa_convert.options import Options, option
from gqa_convert.units import parse_tokens

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


def finished_manifest(final: Path, job: dict[str, Any]) -> dict[str, Any] | None:
    """The manifest of `final` when it holds this very job, finished. A token folder there whose
    manifest is damaged is refused with one line (it is not this job, nor safely replaceable)."""
    if not is_token_folder(final):
        return None
    try:
        manifest = read_manifest(final)
    except DamagedTokenFolder as error:
        raise GQAConvertError(
            f"{final} holds a damaged token folder ({error.why}): delete it, then tokenize again"
        ) from None
    except GQAConvertError:
        return None  # another format: the output checks decide
    return manifest if manifest.get("job") == job else None


def _changed_file(data: str, job: dict[str, Any], columns: Columns) -> str | None:
    """A file of the corpus that is not as it was when the job was described (local data)."""
    if not is_local(data):
        return None
    now = corpus_identity(data, columns)
    if now == job["source"]:
        return None
    before = {file["path"]: file for file in job["source"].get("files", [])}
    changed = [file["path"] for file in now.get("files", []) if before.pop(file["path"], None) != file]
    return next(iter(changed + list(before)), data)


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
    staging, itemsize = staging_of(final), info.dtype.itemsize
    try:
        with staging_for(staging, job, options.force):
            records = {u.index: r for u in units if (r := finished_record(staging, u.index, itemsize))}
            resumed = len(records)
            try:
                manifest = _tokenize_units(data, units, records, staging, info, options, job)
            except (UnitIOError, OSError):
                raise
            except GQAConvertError:
                shutil.rmtree(staging, ignore_errors=True)  # bad input: a rerun with fixed data is another job
                raise
            except BaseException:  # interrupted: the finished units stay for a rerun, nothing half written
                remove_temporary(staging)
                raise
            finalize(staging, final, manifest)
    except (UnitIOError, OSError) as error:
        raise io_failure(error, staging, units, itemsize) from None
    return {**manifest, "seconds": round(time.perf_counter() - started, 3), "resumed_units": resumed}


def _tokenize_units(
    data: str,
    units: list[WorkUnit],
    records: dict[int, dict[str, Any]],
    staging: Path,
    info: TokenizerInfo,
    options: TokenizeOptions,
    job: dict[str, Any],
) -> dict[str, Any]:
    """Tokenize the units not done yet, check what came out, and return the manifest to write."""
    shard_job = ShardJob(str(staging), info.serialized, info.identity["eos_token_id"], info.dtype.name, options.columns)
    todo = [unit for unit in units if unit.index not in records]
    enough = lambda: _prefix(units, records, options.max_tokens) is not None  # noqa: E731
    run_units(todo, shard_job, records, options.num_proc, options.progress, enough)
    changed = _changed_file(data, job, options.columns)
    if changed is not None:
        raise changed_error(changed)
    listed = _prefix(units, records, options.max_tokens)
    assert listed is not None, "every unit of the listed run is done"
    source = {**source_signature(data, options.columns), "units": len(units), "units_used": len(listed)}
    shards = [records[unit.index] for unit in listed]
    manifest = build_manifest(shards, info.identity, info.dtype.name, source, max_tokens=options.max_tokens, job=job)
    if manifest["tokens"] == 0:
        raise GQAConvertError(f"{data} holds no text to tokenize (every file or row is empty): give a corpus with text")
    return manifest


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
