"""Documents from local files (tables: .jsonl/.json/.parquet/.csv/.arrow; any other file is UTF-8
text), folders of them, or a Hub dataset id, and text tokenized as one string (for perplexity and
calibration). A row's text must be a string; an empty or null cell is an empty document, skipped."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from gqa_convert.data.files import TABLE_LOADERS, file_kind, local_files
from gqa_convert.errors import GQAConvertError, one_line

_HUB_DATASET = re.compile(r"^[A-Za-z0-9][\w-]*(/[A-Za-z0-9][\w.-]*)?$")
_CHECKED_BYTES = 1 << 16  # the head of each text file is checked for UTF-8 before any work
_KINDS = ((bool, "true or false"), (int, "a number"), (float, "a number"), (list, "a list"), (dict, "an object"))


def is_hub_id(data: str | Path) -> bool:
    """Not a local path, and shaped like a Hub dataset id (`name` or `org/name`, no file suffix)."""
    return not Path(data).exists() and bool(_HUB_DATASET.match(str(data))) and not Path(data).suffix


def document_text(value: Any, column: str, where: str | Callable[[], str]) -> str | None:
    """The text of one row: a string; None for an empty or null cell (an empty document, skipped).
    Anything else (a list, an object, a number, a string holding an unpaired surrogate escape) is
    refused with one line naming the row (`where`, or a function that says it): its Python form is
    never tokenized."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.isascii():
            return value or None
        try:
            value.encode("utf-8")
            return value
        except UnicodeEncodeError as error:
            kind = f"an unpaired surrogate escape at character {error.start}"
    else:
        kind = next((name for types, name in _KINDS if isinstance(value, types)), type(value).__name__)
    place = where() if callable(where) else where
    raise GQAConvertError(
        f"{place}: column '{column}' holds {kind}, not text: pass --text-column with the column that holds "
        "the text, or fix the row"
    )


def not_utf8(file: Path, byte: int | None = None) -> GQAConvertError:
    where = f" (byte {byte})" if byte is not None else ""
    return GQAConvertError(
        f"{file} is not UTF-8 text{where}: convert it to UTF-8, or give a table ({', '.join(TABLE_LOADERS)})"
    )


def _check_utf8(file: Path) -> None:
    try:
        with open(file, "rb") as handle:
            head = handle.read(_CHECKED_BYTES)
    except OSError as error:
        raise GQAConvertError(f"cannot read {file} ({error.strerror}): make it readable") from None
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as error:
        if error.start < len(head) - 4:  # not merely a character cut at the end of the head
            raise not_utf8(file, error.start) from None


def _check_named(data: str | Path) -> None:
    if not str(data).strip():  # Path("") would be the current directory
        raise GQAConvertError("the data path is empty: give a file, a folder or a Hub dataset id")


def check_data(data: str | Path) -> None:
    """A local path must exist (text files must start as UTF-8); anything else is a Hub dataset id."""
    _check_named(data)
    path = Path(data)
    if not path.exists() and not is_hub_id(data):
        raise GQAConvertError(f"data not found: {data}")
    if path.exists():
        for file in local_files(path):
            if file_kind(file) == "text":
                _check_utf8(file)


def iter_documents(
    data: str | Path, text_column: str = "text", data_config: str | None = None, split: str = "train"
) -> Iterator[tuple[str, bool]]:
    """(text, ends_document) pieces. A text file is one document, read in pieces so a large file never
    sits in memory at once; a row of a table is one document."""
    _check_named(data)
    path = Path(data)
    if path.exists():
        for file in local_files(path):
            if file_kind(file) == "text":
                yield from _text_pieces(file)
                continue
            yield from ((text, True) for text in column_texts(load_table(file), text_column, file))
        return
    if not is_hub_id(data):
        raise GQAConvertError(f"data not found: {data}")
    yield from ((text, True) for text in column_texts(load_hub(str(data), data_config, split), text_column, data))


def _text_pieces(file: Path, piece_chars: int = 1 << 20) -> Iterator[tuple[str, bool]]:
    """A text file as one document, in pieces of piece_chars characters (read_text joins them again)."""
    try:
        with open(file, encoding="utf-8") as handle:
            piece = handle.read(piece_chars)
            while piece:
                following = handle.read(piece_chars)
                yield piece, not following
                piece = following
    except UnicodeDecodeError:
        raise not_utf8(file) from None
    except OSError as error:
        raise GQAConvertError(f"cannot read {file} ({error.strerror}): make it readable") from None


def load_table(file: Path) -> Any:
    import datasets

    datasets.disable_progress_bars()
    try:
        return datasets.load_dataset(file_kind(file), data_files=str(file), split="train", streaming=True)
    except Exception as error:  # datasets raises many types for unreadable files
        raise GQAConvertError(f"{file} could not be read as {file_kind(file)}: {error}") from None


def load_hub(name: str, data_config: str | None, split: str) -> Any:
    if os.environ.get("HF_DATASETS_OFFLINE") == "1" or os.environ.get("HF_HUB_OFFLINE") == "1":
        raise GQAConvertError(f"data '{name}' is not a local path and the Hub is offline: pass a local file")
    import datasets

    try:
        return datasets.load_dataset(name, data_config, split=split, streaming=True)
    except Exception as error:  # network and not-found errors have many types
        raise GQAConvertError(
            f"could not open dataset '{name}' ({type(error).__name__}): check the id "
            "and your network, or pass a local file"
        ) from None


def _rows(rows: Any, where: object) -> Iterator[Any]:
    """The rows of a dataset; a row that cannot be parsed (a malformed JSON line) is an error naming the file."""
    iterator = iter(rows)
    while True:
        try:
            row = next(iterator)
        except StopIteration:
            return
        except Exception as error:  # datasets and pyarrow raise many types for malformed files
            raise GQAConvertError(f"{where} could not be read ({one_line(error)[:300]}): fix the file") from None
        yield row


def column_texts(rows: Any, text_column: str, where: object) -> Iterator[str]:
    """The texts of a table's rows, in order; empty and null cells skipped (see document_text)."""
    for number, row in enumerate(_rows(rows, where), 1):
        if text_column not in row:
            raise GQAConvertError(
                f"{where} has no column '{text_column}' (columns: {', '.join(row)}): pass --text-column"
            )
        text = document_text(row[text_column], text_column, f"{where}, row {number}")
        if text is not None:
            yield text


def read_text(data: str | Path, text_column: str = "text", data_config: str | None = None, split: str = "train") -> str:
    """All documents as one string (for perplexity): a text file exactly as it is."""
    parts = []
    for text, ends_document in iter_documents(data, text_column, data_config, split):
        parts.append(text + ("\n\n" if ends_document else ""))
    text = "".join(parts).removesuffix("\n\n")
    if not text.strip():
        raise GQAConvertError(f"{data} holds no text")
    return text


def tokenize_text(tokenizer: Any, text: str, max_tokens: int | None = None):  # -> torch.Tensor
    """The text as one sequence of ids (no special tokens), at most max_tokens."""
    import torch

    if max_tokens is not None and max_tokens < 2:
        raise GQAConvertError(f"{max_tokens} token(s) asked for: at least 2 are needed (one to predict from)")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if len(ids) < 2:
        raise GQAConvertError(f"the text gives {len(ids)} token(s), fewer than 2: give more text")
    return torch.tensor(ids[:max_tokens] if max_tokens is not None else ids, dtype=torch.long)
