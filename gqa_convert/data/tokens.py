"""Token files: documents tokenized once into a flat uint16/uint32 file (joined by EOS) with a small
JSON sidecar, and read back memory-mapped as fixed-length blocks.

Blocks are addressed by a global index, so the position in the data is a pure function of the step:
epoch e visits every block once in an order drawn from (seed, e); resuming at step s needs no state.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from gqa_convert.data.text import local_files
from gqa_convert.errors import GQAConvertError


def open_tokens(path: Path) -> np.memmap:
    """A token file, memory-mapped (its sidecar .json gives the count and dtype)."""
    meta = json.loads(path.with_suffix(".json").read_text())
    return np.memmap(path, dtype=meta["dtype"], mode="r", shape=(meta["tokens"],))


def tokenize_to_file(
    documents: Iterator[tuple[str, bool]],
    tokenizer: Any,
    path: Path,
    max_tokens: int | None = None,
    batch_documents: int = 256,
    on_tokens: Callable[[int], None] | None = None,
) -> int:
    """Tokenize documents (no special tokens), each followed by EOS, into a flat uint16/uint32 file.
    Stops after max_tokens. Returns the token count. Written to a temporary name, then renamed."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise GQAConvertError("the tokenizer has no EOS token to separate documents")
    dtype = np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max else np.uint32
    partial = path.with_suffix(".partial")
    count = 0
    with open(partial, "wb") as handle:
        batch: list[str] = []
        ends: list[bool] = []

        def flush() -> int:
            encoded = tokenizer(batch, add_special_tokens=False)["input_ids"]
            pieces = ((*doc, eos) if end else doc for doc, end in zip(encoded, ends))
            ids = np.fromiter((t for piece in pieces for t in piece), dtype=dtype)
            ends.clear()
            if max_tokens is not None:
                ids = ids[: max_tokens - count]
            handle.write(ids.tobytes())
            batch.clear()
            if on_tokens is not None:
                on_tokens(len(ids))
            return len(ids)

        for document, ends_document in documents:
            batch.append(document)
            ends.append(ends_document)
            if len(batch) >= batch_documents:
                count += flush()
                if max_tokens is not None and count >= max_tokens:
                    break
        if batch and (max_tokens is None or count < max_tokens):
            count += flush()
    partial.rename(path)
    path.with_suffix(".json").write_text(json.dumps({"tokens": count, "dtype": np.dtype(dtype).name}))
    return count


@dataclass
class TokenBlocks:
    """A flat token file read as blocks of seq_len tokens; the tail shorter than a block is unused."""

    path: Path
    seq_len: int
    seed: int

    def __post_init__(self) -> None:
        self.tokens = open_tokens(self.path)
        self.num_blocks = len(self.tokens) // self.seq_len
        self._order: dict[int, np.ndarray] = {}

    def epoch_of(self, index: int) -> int:
        return index // self.num_blocks

    def block(self, index: int) -> np.ndarray:
        """Block `index` of the endless stream: epoch index // n, each epoch a fresh permutation."""
        epoch, position = divmod(index, self.num_blocks)
        if epoch not in self._order:
            self._order = {epoch: np.random.default_rng([self.seed, epoch]).permutation(self.num_blocks)}
        start = int(self._order[epoch][position]) * self.seq_len
        return np.asarray(self.tokens[start : start + self.seq_len], dtype=np.int64)


def data_fingerprint(data: str | Path, tokenizer: Any, text_column: str, extra: str = "") -> str:
    """Identifies a tokenized file: the data (paths, sizes, mtimes), tokenizer and column."""
    path = Path(data)
    parts = [str(data), text_column, extra, getattr(tokenizer, "name_or_path", ""), str(len(tokenizer))]
    if path.exists():
        for file in local_files(path):
            stat = file.stat()
            parts.append(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
