"""A tokenizing worker: it turns one work unit into one shard (flat token ids, each document followed
by EOS), written under a temporary name and renamed, then a small record beside it that marks the unit
done. The fast tokenizer is rebuilt from its JSON in each worker and encodes batches of pieces.

Kept light on purpose (numpy and tokenizers only): worker processes start from this module.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gqa_convert.data.units import Columns, WorkUnit, unit_documents

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


def tokenize_unit(unit: WorkUnit) -> dict[str, Any]:
    """Tokenize one unit into its shard; returns its record (file, tokens, documents)."""
    job: ShardJob = _WORKER["job"]
    folder = Path(job.folder)
    final = folder / shard_name(unit.index)
    partial = folder / f".{final.name}.{os.getpid()}.tmp"
    tokens = documents = 0
    with open(partial, "wb") as handle:
        for texts, ends in _batches(unit_documents(unit, job.columns)):
            ids = encode_documents(_WORKER["encode"], texts, ends, job.eos, job.dtype)
            handle.write(ids.tobytes())
            tokens += len(ids)
            documents += sum(ends)
            with _WORKER["counter"].get_lock():
                _WORKER["counter"].value += len(ids)
    partial.replace(final)
    record = {"file": final.name, "tokens": tokens, "documents": documents}
    _write_record(record_path(folder, unit.index), record)
    return record


def _write_record(path: Path, record: dict[str, Any]) -> None:
    partial = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    partial.write_text(json.dumps(record))
    partial.replace(path)


def finished_record(folder: Path, index: int, itemsize: int) -> dict[str, Any] | None:
    """The record of a unit finished by an earlier run, if its shard is whole."""
    path = record_path(folder, index)
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    shard = folder / record["file"]
    if not shard.is_file() or shard.stat().st_size != record["tokens"] * itemsize:
        return None
    return record
