"""The token ids a calibration runs on, and where their text comes from.

A recipe names its text source (`calibration.text`), a key of TEXT_SOURCES. Each source gives one or
more parts of (windows, seq_len) token ids; the calibration tokens are shared equally between the
parts and their windows interleaved, so that every batch, and the held-out batches, mix them.
Today the only source is the user's text; a source the model writes itself (sampled from the source
model) is one more entry here, and a recipe that names it needs no --calib-data.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

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
    check_data(data)
    ids = tokenize_text(checkpoint.tokenizer(check_vocab=True), read_text(data, text_column), max_tokens=tokens)
    windows = len(ids) // seq_len
    if windows < 1 or windows * seq_len < min(tokens, 4 * seq_len):
        raise GQAConvertError(
            f"{data} gives {len(ids)} tokens: calibration needs at least {min(tokens, 4 * seq_len)} from it "
            f"(--calib-tokens {tokens} per text, --calib-seq-len {seq_len}); give more text"
        )
    return ids[: windows * seq_len].view(windows, seq_len)


def _user_windows(checkpoint: Checkpoint, text: CalibrationText, share: int) -> list[torch.Tensor]:
    return [_text_windows(checkpoint, data, share, text.seq_len, text.text_column) for data in text.data]


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
