"""The token ids a calibration runs on, and where their text comes from.

A recipe names its text source (`calibration.text`), a key of TEXT_SOURCES. Each source gives one or
more parts of (windows, seq_len) token ids; the calibration tokens are shared equally between the
parts and their windows interleaved, so that every batch, and the held-out batches, mix them.
    user  the texts given with --calib-data (needed)
    self  the source model writes its own text (self_generated.py), needing none from the user; texts
          given with --calib-data join it as further parts (a mix of the model's text and the user's)
The model's text is kept in OUT/calibration/ (ids and decoded text, id_file.py); that ids file given
back as --calib-data calibrates on exactly those ids.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from gqa_convert.calibration.id_file import is_id_file, read_id_file, write_id_file
from gqa_convert.calibration.self_generated import Generation, self_generate
from gqa_convert.data.text import check_data, read_text, tokenize_text
from gqa_convert.errors import GQAConvertError
from gqa_convert.io.sources import Checkpoint


@dataclass(frozen=True)
class CalibrationText:
    """What a calibration reads: the source named by `origin`, the texts given, and how many tokens."""

    origin: str  # a key of TEXT_SOURCES
    data: tuple[str, ...]  # the user's texts (files, folders, tables or Hub dataset ids)
    tokens: int
    seq_len: int
    text_column: str = "text"
    generation: Generation = field(default_factory=Generation)  # how the model writes its text (self)
    device: str = "cpu"  # where the model writes it
    keep: Path | None = None  # a folder for the model's text (ids and decoded)
    document_tokens: int | None = None  # self: the length of each sequence the model writes (None: seq_len)


@dataclass(frozen=True)
class TextSource:
    """Where calibration text comes from: how many parts share the tokens (given the number of texts
    the user gave) and the parts themselves, each (windows, seq_len)."""

    name: str
    help: str
    needs_user_text: bool
    parts: Callable[[int], int]
    windows: Callable[[Checkpoint, CalibrationText, int], list[torch.Tensor]]


def _text_windows(checkpoint: Checkpoint, data: str, tokens: int, seq_len: int, text_column: str) -> torch.Tensor:
    if is_id_file(data):  # ids a conversion kept (the model's own text): exactly those, not re-tokenized
        sequences = read_id_file(data, int(checkpoint.config.vocab_size), _tokenizer(checkpoint, data), tokens)
        if seq_len % sequences.shape[1]:  # whole sequences end to end in a window are as written
            warnings.warn(
                f"{data} holds sequences of {sequences.shape[1]} tokens: windows of --calib-seq-len {seq_len} "
                f"run across them (--calib-seq-len {sequences.shape[1]} calibrates on them as they were written)",
                stacklevel=2,
            )
        ids = sequences.reshape(-1)[:tokens]
    else:
        check_data(data)
        ids = tokenize_text(checkpoint.tokenizer(check_vocab=True), read_text(data, text_column), max_tokens=tokens)
    windows = len(ids) // seq_len
    if windows < 1 or windows * seq_len < min(tokens, 4 * seq_len):
        raise GQAConvertError(
            f"{data} gives {len(ids)} tokens: calibration needs at least {min(tokens, 4 * seq_len)} from it "
            f"(--calib-tokens {tokens} per text, --calib-seq-len {seq_len}); give more text"
        )
    return ids[: windows * seq_len].view(windows, seq_len)


def _tokenizer(checkpoint: Checkpoint, data: str) -> Any | None:
    """The model's tokenizer, to check an ids file against; where the model has none, a warning that
    the file cannot be checked (its ids need no tokenizer)."""
    try:
        return checkpoint.tokenizer()
    except GQAConvertError:
        warnings.warn(
            f"{checkpoint.source} has no tokenizer: {data} cannot be checked to be written for this model's",
            stacklevel=3,
        )
        return None


def _user_windows(checkpoint: Checkpoint, text: CalibrationText, share: int) -> list[torch.Tensor]:
    return [_text_windows(checkpoint, data, share, text.seq_len, text.text_column) for data in text.data]


SELF_GENERATED = "self_generated"  # the name of the kept ids (.safetensors) and text (.txt)


def _self_windows(checkpoint: Checkpoint, text: CalibrationText, share: int) -> list[torch.Tensor]:
    """The user's texts, if any, and as many tokens written by the source model (kept in text.keep):
    documents of text.document_tokens, end to end in the windows (as pre-training packs documents)."""
    parts = _user_windows(checkpoint, text, share)
    length = min(text.document_tokens or text.seq_len, text.seq_len)
    windows = max(1, share // text.seq_len)
    documents = -(-windows * text.seq_len // length)
    generated = self_generate(checkpoint, documents, length, text.generation, text.device)
    if text.keep is not None:
        text.keep.mkdir(exist_ok=True)
        made_by = {"source": checkpoint.source, "device": text.device, **asdict(text.generation)}
        write_id_file(text.keep, SELF_GENERATED, generated, checkpoint.tokenizer(), made_by)
    return [*parts, generated.reshape(-1)[: windows * text.seq_len].view(windows, text.seq_len)]


TEXT_SOURCES: dict[str, TextSource] = {
    source.name: source
    for source in (
        TextSource(
            "user",
            "the texts given with --calib-data (text of the model's domain; several share the tokens equally)",
            needs_user_text=True,
            parts=lambda texts: texts,
            windows=_user_windows,
        ),
        TextSource(
            "self",
            "text the source model writes itself (no data needed; texts given with --calib-data join it, "
            "sharing the tokens equally)",
            needs_user_text=False,
            parts=lambda texts: texts + 1,
            windows=_self_windows,
        ),
    )
}


def token_share(text: CalibrationText) -> int:
    """The calibration tokens of each part; refused when a part cannot hold one window."""
    parts = TEXT_SOURCES[text.origin].parts(len(text.data))
    share = text.tokens // max(parts, 1)
    if share < text.seq_len:
        per = f" per text ({parts} texts share them)" if parts > 1 else ""
        raise GQAConvertError(
            f"--calib-tokens {text.tokens} gives {share} tokens{per}, less than one window of --calib-seq-len "
            f"{text.seq_len}: raise --calib-tokens or lower --calib-seq-len"
        )
    return share


def calibration_ids(checkpoint: Checkpoint, text: CalibrationText) -> torch.Tensor:
    """(n, seq_len) token ids: an equal share of the tokens from each part, the parts' windows interleaved."""
    parts = TEXT_SOURCES[text.origin].windows(checkpoint, text, token_share(text))
    order = sorted((position, part) for part, windows in enumerate(parts) for position in range(len(windows)))
    return torch.stack([parts[part][position] for position, part in order])
