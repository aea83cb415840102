"""Token folders read back: the shards memory-mapped as one stream of ids (their concatenation in
manifest order), read as fixed-length blocks in a per-epoch order; and the first tokens of a corpus
tokenized in this process, for evaluation data and dry runs.

Blocks are addressed by a global index, so the position in the data is a pure function of the step:
epoch e visits every block once in the order BlockOrder gives for (seed, e), computed per index in
constant memory; resuming at step s needs no state. A block may span two shards.
"""

from __future__ import annotations

import bisect
import shutil
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from gqa_convert.data.manifest import TokenizerInfo, build_manifest, read_manifest, write_json_atomic
from gqa_convert.data.manifest_schema import damaged
from gqa_convert.data.permutation import BlockOrder
from gqa_convert.data.readers import unit_documents
from gqa_convert.data.units import MIN_UNIT_BYTES, Columns, plan_units, source_signature
from gqa_convert.data.worker import encode_documents, shard_name
from gqa_convert.errors import GQAConvertError, is_disk_full

OPEN_SHARDS = 64  # memory maps kept open (each holds a file descriptor)


class TokenStream:
    """The ids of a token folder as one sequence; shards are mapped on first use. Given vocab_size,
    every read is checked against it (a shard altered after its manifest was written)."""

    def __init__(self, folder: str | Path, vocab_size: int | None = None) -> None:
        self.folder = Path(folder)
        self.vocab_size = vocab_size
        manifest = read_manifest(self.folder)
        self.dtype = np.dtype(manifest["dtype"])
        self.files = [shard["file"] for shard in manifest["shards"] if shard["tokens"]]
        sizes = [shard["tokens"] for shard in manifest["shards"] if shard["tokens"]]
        self.starts = [0, *np.cumsum(sizes).tolist()]  # one entry per shard, not per token or block
        self._maps: OrderedDict[int, np.memmap] = OrderedDict()

    def __len__(self) -> int:
        return self.starts[-1]

    def _shard(self, index: int) -> np.memmap:
        if index in self._maps:
            self._maps.move_to_end(index)
        else:
            size = self.starts[index + 1] - self.starts[index]
            self._maps[index] = np.memmap(self.folder / self.files[index], dtype=self.dtype, mode="r", shape=(size,))
            if len(self._maps) > OPEN_SHARDS:
                self._maps.popitem(last=False)
        return self._maps[index]

    def read(self, start: int, length: int) -> np.ndarray:
        """Ids [start, start + length) as int64, across shard boundaries."""
        if start < 0 or start + length > len(self):
            raise IndexError(f"tokens [{start}, {start + length}) are outside [0, {len(self)})")
        parts, position, end = [], start, start + length
        shard = bisect.bisect_right(self.starts, start) - 1
        while position < end:
            offset = position - self.starts[shard]
            take = min(end, self.starts[shard + 1]) - position
            parts.append(self._shard(shard)[offset : offset + take])
            position += take
            shard += 1
        ids = np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)
        if self.vocab_size is not None and len(ids) and (largest := int(ids.max())) >= self.vocab_size:
            raise damaged(self.folder, f"token id {largest} in tokens [{start}, {end}) is past the vocabulary size")
        return ids


class TokenBlocks:
    """A token stream read as blocks of seq_len tokens; the tail shorter than a block is unused."""

    def __init__(self, folder: str | Path, seq_len: int, seed: int, vocab_size: int | None = None) -> None:
        self.stream = TokenStream(folder, vocab_size)
        self.seq_len = seq_len
        self.num_blocks = len(self.stream) // seq_len
        self.order = BlockOrder(self.num_blocks, seed)

    def epoch_of(self, index: int) -> int:
        return index // self.num_blocks

    def block(self, index: int) -> np.ndarray:
        """Block `index` of the endless stream: epoch index // n, each epoch in its own order."""
        epoch, position = divmod(index, self.num_blocks)
        return self.stream.read(self.order(epoch, position) * self.seq_len, self.seq_len)


def read_head(folder: str | Path, max_tokens: int) -> np.ndarray:
    """The first max_tokens ids of a token folder (all of them if it holds fewer), as int64."""
    stream = TokenStream(folder)
    return stream.read(0, min(max_tokens, len(stream)))


def _documents(data: str, columns: Columns) -> Iterator[tuple[str, bool]]:
    for unit in plan_units(data, columns, MIN_UNIT_BYTES):
        yield from unit_documents(unit, columns)


def tokenize_head(
    data: str, columns: Columns, info: TokenizerInfo, folder: Path, max_tokens: int, job: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The first max_tokens tokens of a corpus, tokenized in this process into a one-shard token
    folder (written beside `folder` and renamed; `job` recorded in its manifest). Returns the manifest.
    Nothing is left behind on any failure; an OSError is one line."""
    partial = folder.parent / f".{folder.name.lstrip('.')}.partial"
    try:
        _write_head(data, columns, info, partial, max_tokens, job)
        shutil.rmtree(folder, ignore_errors=True)
        partial.rename(folder)
    except OSError as error:
        shutil.rmtree(partial, ignore_errors=True)
        writing = error.filename is None or Path(error.filename).parent == partial
        action, path = ("write", folder) if writing else ("read", error.filename)
        fix = "free space" if is_disk_full(error) else f"make {path} {'writable' if writing else 'readable'}"
        raise GQAConvertError(
            f"cannot {action} {path} ({error.strerror or 'input/output error'}); nothing was kept: {fix} and run again"
        ) from None
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return read_manifest(folder)


def _write_head(
    data: str, columns: Columns, info: TokenizerInfo, partial: Path, max_tokens: int, job: dict[str, Any] | None
) -> None:
    from tokenizers import Tokenizer

    bare = Tokenizer.from_str(info.serialized)
    encode = getattr(bare, "encode_batch_fast", bare.encode_batch)
    eos, dtype = info.identity["eos_token_id"], info.dtype.name
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    count = documents = 0
    largest = -1
    with open(partial / shard_name(0), "wb") as handle:
        for text, ends in _documents(data, columns):
            ids = encode_documents(encode, [text], [ends], eos, dtype)[: max_tokens - count]
            handle.write(ids.tobytes())
            count, documents = count + len(ids), documents + ends
            largest = max(largest, int(ids.max())) if len(ids) else largest
            if count >= max_tokens:
                break
    if count == 0:
        raise GQAConvertError(f"{data} holds no text to tokenize (every file or row is empty): give a corpus with text")
    shards = [{"file": shard_name(0), "tokens": count, "documents": documents, "max_token_id": largest}]
    source = source_signature(data, columns)
    write_json_atomic(
        partial / "manifest.json",
        build_manifest(shards, info.identity, dtype, source, max_tokens=max_tokens, head=True, job=job),
    )
