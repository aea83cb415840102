"""A tokenizing worker: it turns one work unit into one shard (flat token ids, each document followed
by EOS), written under a temporary name and renamed, then a small record beside it that marks the unit
done. The fast tokenizer is rebuilt from its JSON in each worker and encodes batches of pieces. An
OSError while reading or writing becomes a UnitIOError (picklable, naming the path) and the unit's
temporary file is removed: the caller decides what to keep.

Kept light on purpose (numpy and tokenizers only): worker processes start from this module.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gqa_convert.data.readers import unit_documents
from gqa_convert.data.units import Columns, WorkUnit
from gqa_convert.errors import GQAConvertError

BATCH_CHARS = 1 << 20  # text encoded per call of the tokenizer
BATCH_DOCUMENTS = 512


@dataclass(frozen=True)
class ShardJob:
    """What every worker of one tokenization shares."""

    folder: str  # the staging folder the shards are written into
    tokenizer_json: str
    eos: int
    dtype: str
    columns: Columns


_WORKER: dict[str, Any] = {}  # this process's tokenizer, job and progress counter
_RECORD_FIELDS = ("tokens", "documents", "max_token_id")


class UnitIOError(GQAConvertError):
    """An OSError met while a unit was read or written: the path, the errno and which of the two."""

    def __init__(self, path: str, errno_value: int | None, action: str) -> None:
        super().__init__(path, errno_value, action)
        self.path, self.errno_value, self.action = path, errno_value, action

    def __str__(self) -> str:
        reason = os.strerror(self.errno_value) if self.errno_value else "input/output error"
        return f"cannot {self.action} {self.path} ({reason})"


def shard_name(index: int) -> str:
    return f"shard-{index:06d}.tokens"


def record_path(folder: Path, index: int) -> Path:
    return folder / f"shard-{index:06d}.json"


def _die_with_parent() -> None:
    """Linux: a worker whose parent is killed (kill -9 of the run) is killed too, not left writing."""
    try:
        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start_worker(job: ShardJob, counter: Any, in_pool: bool = True) -> None:
    """Set up this process (a pool worker, or the main process when it works alone)."""
    from tokenizers import Tokenizer

    if in_pool:
        os.environ["TOKENIZERS_PARALLELISM"] = "false"  # the pool gives each core its own process
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # the main process handles Ctrl-C and stops the pool
        _die_with_parent()
    tokenizer = Tokenizer.from_str(job.tokenizer_json)
    encode = getattr(tokenizer, "encode_batch_fast", tokenizer.encode_batch)  # fast: no offsets
    _WORKER.update(job=job, encode=encode, counter=counter)


def _batches(documents: Iterator[tuple[str, bool]]) -> Iterator[tuple[list[str], list[bool]]]:
    texts: list[str] = []
    ends: list[bool] = []
    chars = 0
    for text, ends_document in documents:
        texts.append(text)
        ends.append(ends_document)
        chars += len(text)
        if chars >= BATCH_CHARS or len(texts) >= BATCH_DOCUMENTS:
            yield texts, ends
            texts, ends, chars = [], [], 0
    if texts:
        yield texts, ends


def encode_documents(encode: Any, texts: list[str], ends: list[bool], eos: int, dtype: str) -> np.ndarray:
    """The documents' ids (no special tokens), EOS after each that ends a document."""
    ids: list[int] = []
    for encoding, ends_document in zip(encode(texts, add_special_tokens=False), ends):
        ids += encoding.ids
        if ends_document:
            ids.append(eos)
    return np.array(ids, dtype=dtype)


def _read(unit: WorkUnit, columns: Columns) -> Iterator[tuple[str, bool]]:
    documents = unit_documents(unit, columns)
    while True:
        try:
            piece = next(documents)
        except StopIteration:
            return
        except OSError as error:
            raise UnitIOError(str(error.filename or unit.source), error.errno, "read") from None
        yield piece


def _write_shard(unit: WorkUnit, job: ShardJob, partial: Path) -> dict[str, int]:
    counts = dict.fromkeys(_RECORD_FIELDS, 0)
    counts["max_token_id"] = -1  # none yet
    with open(partial, "wb") as handle:
        for texts, ends in _batches(_read(unit, job.columns)):
            ids = encode_documents(_WORKER["encode"], texts, ends, job.eos, job.dtype)
            handle.write(ids.tobytes())
            counts["tokens"] += len(ids)
            counts["documents"] += sum(ends)
            if len(ids):
                counts["max_token_id"] = max(counts["max_token_id"], int(ids.max()))
            with _WORKER["counter"].get_lock():
                _WORKER["counter"].value += len(ids)
    return counts


def tokenize_unit(unit: WorkUnit) -> dict[str, Any]:
    """Tokenize one unit into its shard; returns its record (file, tokens, documents, max_token_id)."""
    job: ShardJob = _WORKER["job"]
    folder = Path(job.folder)
    final = folder / shard_name(unit.index)
    partial = folder / f".{final.name}.{os.getpid()}.tmp"
    try:
        record = {"file": final.name, **_write_shard(unit, job, partial)}
        partial.replace(final)
        _write_record(record_path(folder, unit.index), record)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise UnitIOError(str(error.filename or partial), error.errno, "write") from None
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return record


def _write_record(path: Path, record: dict[str, Any]) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(record))
    partial.replace(path)


def _is_count(value: Any, least: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= least


def finished_record(folder: Path, index: int, itemsize: int) -> dict[str, Any] | None:
    """The record of a unit finished by an earlier run, if it is well formed and its shard is whole;
    None otherwise (the unit is tokenized again)."""
    path = record_path(folder, index)
    try:
        record = json.loads(path.read_bytes()[:4096])
        shard = os.lstat(folder / shard_name(index))
    except (OSError, ValueError):
        return None
    if not isinstance(record, dict) or record.get("file") != shard_name(index):
        return None
    least = {"max_token_id": -1}  # -1: an empty shard
    if not all(_is_count(record.get(field), least.get(field, 0)) for field in _RECORD_FIELDS):
        return None
    if not stat.S_ISREG(shard.st_mode) or shard.st_size != record["tokens"] * itemsize:
        return None
    return record
