"""Where a text file is cut into pieces that are tokenized one by one (a text file is one document,
so the pieces are joined without EOS).

The pieces are a property of the file alone, never of how it is split among workers: the file is cut
at every paragraph boundary (a blank line) and, so that no piece grows large, at the first line
boundary at or after every multiple of PIECE_BYTES. A work unit is a byte range between two cuts, so
any split into units gives the same tokens.

A cut falls before the last character of a run of whitespace that holds a line break and is followed
by a visible character: "...end.\\n\\n|\\nNext" or " \\n \\n| Next". The regex pre-tokenizers of
byte-level BPE tokenizers (GPT-2, SmolLM2 and their kin) already split exactly there, so for them the
pieces tokenize to the same ids as the whole file in one call.
"""

from __future__ import annotations

import re
from typing import BinaryIO

PIECE_BYTES = 16 << 10
_WHITESPACE = b"\t\n\x0b\x0c\r "
# a byte that starts a visible character: ASCII, or a UTF-8 lead byte whose characters hold no whitespace
_VISIBLE_NEXT = rb"(?=[!-~\xc3-\xe0\xe4-\xf4])"
PARAGRAPH = re.compile(rb"\n[\t-\r ]*\n[\t-\r ]*" + _VISIBLE_NEXT)
LINE = re.compile(rb"\n[\t-\r ]*" + _VISIBLE_NEXT)


def _run_start(buffer: bytes, position: int) -> int:
    """The start of the whitespace run that ends just before `position` (or `position` itself)."""
    while position > 0 and buffer[position - 1] in _WHITESPACE:
        position -= 1
    return position


def first_cut(pattern: re.Pattern[bytes], buffer: bytes, at_least: int) -> int | None:
    """The first cut of `pattern` at position >= at_least in buffer (positions relative to buffer)."""
    position = _run_start(buffer, at_least)
    while (match := pattern.search(buffer, position)) is not None:
        if match.end() - 1 >= at_least:
            return match.end() - 1
        position = match.end()
    return None


def piece_cuts(buffer: bytes, start: int, end: int) -> list[int]:
    """The cuts strictly inside (start, end), as file offsets. `buffer` is the file from `start` (0 or
    a cut) to `end` (a cut or the end of the file), plus the byte after `end` where there is one."""
    cuts = {start + match.end() - 1 for match in PARAGRAPH.finditer(buffer)}
    for block in range(start // PIECE_BYTES + 1, (end - 1) // PIECE_BYTES + 1):
        cut = first_cut(LINE, buffer, block * PIECE_BYTES - start)
        if cut is not None:
            cuts.add(start + cut)
    return sorted(cut for cut in cuts if start < cut < end)


def _read_window(handle: BinaryIO, start: int, length: int) -> bytes:
    handle.seek(start)
    return handle.read(length)


def range_boundary(handle: BinaryIO, size: int, target: int) -> int:
    """A cut at or after `target` (a multiple of PIECE_BYTES): the first paragraph boundary within
    PIECE_BYTES, else the first line boundary; the end of the file when there is none."""
    back = 256
    while True:  # start the window before any whitespace run that reaches `target`
        begin = max(0, target - back)
        window = _read_window(handle, begin, target - begin + PIECE_BYTES + 1)
        if begin == 0 or window[0] not in _WHITESPACE:
            break
        back *= 4
    cut = first_cut(PARAGRAPH, window, target - begin)
    if cut is not None and begin + cut < target + PIECE_BYTES:
        return begin + cut
    while (cut := first_cut(LINE, window, target - begin)) is None:
        if begin + len(window) >= size:
            return size  # no line boundary until the end: the rest is one range
        window = _read_window(handle, begin, 2 * len(window))  # a long line: read further
    return begin + cut


def text_ranges(handle: BinaryIO, size: int, unit_bytes: int) -> list[tuple[int, int]]:
    """The file cut into byte ranges of about unit_bytes (a multiple of PIECE_BYTES), at cuts."""
    bounds = [0]
    for target in range(unit_bytes, size, unit_bytes):
        if target > bounds[-1]:
            bounds.append(range_boundary(handle, size, target))
    bounds.append(size)
    bounds = sorted(set(bounds))
    return list(zip(bounds, bounds[1:]))
