"""Text data: local .txt/.jsonl/.json/.parquet files, folders of them, or a Hub dataset id; tokenized
once into a flat token file (documents joined by EOS) that training reads as fixed-length blocks.

Blocks are addressed by a global index, so the position in the data is a pure function of the step:
epoch e visits every block once in an order drawn from (seed, e); resuming at step s needs no state.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from gqa_convert.errors import GQAConvertError

LOADERS = {".txt": "text", ".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def _local_files(data: Path) -> list[Path]:
    if data.is_file():
        if data.suffix not in LOADERS:
            raise GQAConvertError(f"{data}: unsupported data file type; use {', '.join(LOADERS)}")
        return [data]
    files = sorted(p for p in data.rglob("*") if p.is_file() and p.suffix in LOADERS)
    if not files:
        raise GQAConvertError(f"{data} holds no {', '.join(LOADERS)} files")
    kinds = {LOADERS[p.suffix] for p in files}
    if len(kinds) > 1:
        raise GQAConvertError(f"{data} mixes file types ({', '.join(sorted(kinds))}): keep one type per folder")
    return files


def iter_documents(data: str | Path, text_column: str = "text", data_config: str | None = None,
                   split: str = "train") -> Iterator[tuple[str, bool]]:  # fmt: skip
    """(text, ends_document) pieces. A .txt file is one document, read in pieces of whole lines so a
    large file never sits in memory; a row of a table is one document."""
    path = Path(data)
    if path.exists():
        for file in _local_files(path):
            if file.suffix == ".txt":
                yield from _text_pieces(file)
                continue
            yield from ((text, True) for text in _column(_load_local(file), text_column, file))
        return
    if os.sep in str(data) or str(data).startswith("."):
        raise GQAConvertError(f"data not found: {data}")
    yield from ((text, True) for text in _column(_load_hub(str(data), data_config, split), text_column, data))


def _text_pieces(file: Path, piece_chars: int = 1 << 20) -> Iterator[tuple[str, bool]]:
    with open(file, encoding="utf-8", errors="replace") as handle:
        piece = handle.read(piece_chars)
        while piece:
            piece += handle.readline()  # end on a line break: no word is cut between pieces
            following = handle.read(piece_chars)
            yield piece, not following
            piece = following


def _load_local(file: Path) -> Any:
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(LOADERS[file.suffix], data_files=str(file), split="train", streaming=True)
    except Exception as error:  # datasets raises many types for unreadable files
        raise GQAConvertError(f"{file} could not be read as {LOADERS[file.suffix]}: {error}") from None


def _load_hub(name: str, data_config: str | None, split: str) -> Any:
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise GQAConvertError(f"data '{name}' is not a local path and the Hub is offline: pass a local file")
    import datasets

    try:
        return datasets.load_dataset(name, data_config, split=split, streaming=True)
    except Exception as error:  # network and not-found errors have many types
        raise GQAConvertError(f"could not open dataset '{name}' ({type(error).__name__}): check the id "
                              "and your network, or pass a local file") from None  # fmt: skip


def _column(rows: Any, text_column: str, where: object) -> Iterator[str]:
    for row in rows:
        if text_column not in row:
            raise GQAConvertError(f"{where} has no column '{text_column}' (columns: {', '.join(row)}): "
                                  "pass --text-column")  # fmt: skip
        value = row[text_column]
        if value:
            yield str(value)


def read_text(data: str | Path, text_column: str = "text", data_config: str | None = None,
              split: str = "train") -> str:  # fmt: skip
    """All documents as one string (for perplexity): a .txt file exactly as it is."""
    parts = []
    for text, ends_document in iter_documents(data, text_column, data_config, split):
        parts.append(text + ("\n\n" if ends_document else ""))
    text = "".join(parts).removesuffix("\n\n")
    if not text.strip():
        raise GQAConvertError(f"{data} holds no text")
    return text


# ---- tokenized, packed blocks --------------------------------------------------------------------


def check_data(data: str | Path) -> None:
    """A local path must exist; anything else is taken for a Hub dataset id."""
    path = Path(data)
    if not path.exists() and (os.sep in str(data) or str(data).startswith(".") or path.suffix in LOADERS):
        raise GQAConvertError(f"data not found: {data}")
    if path.exists():
        _local_files(path)


def tokenize_to_file(documents: Iterator[tuple[str, bool]], tokenizer: Any, path: Path, max_tokens: int | None = None,
                     batch_documents: int = 256, on_tokens: Any = None) -> int:  # fmt: skip
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
        meta = json.loads(self.path.with_suffix(".json").read_text())
        self.tokens = np.memmap(self.path, dtype=meta["dtype"], mode="r", shape=(meta["tokens"],))
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
        for file in _local_files(path):
            stat = file.stat()
            parts.append(f"{file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]
