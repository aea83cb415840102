"""Where a text file is cut into pieces that are tokenized one by one (a text file is one document,
so the pieces are joined without EOS).

The cuts are a property of the file alone, never of how it is split among workers, and every piece is
at most about 2 x PIECE_BYTES long whatever the file holds (one line of 50 MB, megabytes of blank
lines, no whitespace at all). A *boundary* is the last character of a run of whitespace followed by a
visible character: "...end.\\n\\n|\\nNext" or " \\n \\n| Next". The regex pre-tokenizers of byte-level
BPE tokenizers (GPT-2, SmolLM2 and their kin) split there already, so for them pieces cut at
boundaries tokenize to the same ids as the whole file in one call. A boundary's *breaks* are the line
breaks of its run, counted in the run's last LOOKBACK bytes (so that deciding it needs a bounded window).

The cuts are:
- every paragraph boundary (2 breaks or more);
- for every multiple t of PIECE_BYTES inside the file, one block cut: the first line boundary (a break
  or more) at or after t if it lies within BOUND bytes, else the first boundary of any kind within
  BOUND bytes (a long line, cut between words), else the first UTF-8 character start at or after t
  (a long run without whitespace: the only cut that may change the ids).

A work unit is a byte range between two cuts, so any split into units gives the same pieces. Each
search reads a window of bounded size around its position (file_window), in the planning process and
in the workers alike.
"""

from __future__ import annotations

import re
from typing import BinaryIO

PIECE_BYTES = 16 << 10
BOUND = PIECE_BYTES  # how far past a block's start its cut is searched for (<= PIECE_BYTES: a range
# that starts at a cut then holds no cut of an earlier block)
LOOKBACK = 4 << 10  # a run's breaks are counted in its last LOOKBACK bytes (< PIECE_BYTES - 3)
_WHITESPACE = b"\t\n\x0b\x0c\r "
# a byte that starts a visible character: ASCII, or a UTF-8 lead byte whose characters hold no whitespace
_VISIBLE = re.compile(rb"[!-~\xc3-\xe0\xe4-\xf4]")
# Each search consumes a whole run per match, so the scans stay linear whatever the runs hold.
_TWO_BREAKS = re.compile(rb"\n[\t-\r ]*\n")  # from a run's first break to its last
_ONE_BREAK = re.compile(rb"\n[\t-\r ]*")  # from a run's first break to its end
_REST_OF_RUN = re.compile(rb"[\t-\r ]*")
_BOUNDARY = re.compile(rb"[\t-\r ](?=[!-~\xc3-\xe0\xe4-\xf4])")


class Window:
    """Bytes [base, base + len(data)) of a file of `size` bytes; positions are file offsets."""

    def __init__(self, data: bytes, base: int, size: int) -> None:
        self.data, self.base, self.size = data, base, size

    def _boundary_before(self, run_end: int) -> int | None:
        """The last character of the run that ends just before `run_end` (relative), if a visible
        character follows it."""
        if run_end >= len(self.data) or not _VISIBLE.match(self.data, run_end):
            return None
        return run_end - 1

    def breaks(self, first_break: int, boundary: int) -> int:
        """The breaks of the run ending at `boundary` whose first break is at `first_break` (relative)."""
        return self.data.count(b"\n", max(first_break, boundary - LOOKBACK + 1), boundary + 1)

    def paragraph_cuts(self, low: int, high: int) -> list[int]:
        """Paragraph boundaries strictly inside (low, high), as file offsets."""
        cuts = []
        position = max(0, low + 1 - LOOKBACK - self.base)
        while (match := _TWO_BREAKS.search(self.data, position)) is not None:
            run_end = _REST_OF_RUN.match(self.data, match.end()).end()
            position = run_end
            boundary = self._boundary_before(run_end)
            if boundary is None or boundary + self.base <= low:
                continue
            if boundary + self.base >= high:
                break
            if self.breaks(match.start(), boundary) >= 2:
                cuts.append(boundary + self.base)
        return cuts

    def _line_boundary(self, target: int) -> int | None:
        """The first boundary at or after `target` (relative) with a break, within BOUND."""
        position = max(0, target - LOOKBACK)  # a run reaching `target` may have its break before it
        while (match := _ONE_BREAK.search(self.data, position, target + BOUND + 1)) is not None:
            position = match.end()
            boundary = self._boundary_before(match.end())
            if boundary is None or boundary < target:
                continue
            if boundary >= target + BOUND:
                return None
            if self.breaks(match.start(), boundary) >= 1:
                return boundary
        return None

    def block_cut(self, target: int) -> int:
        """The cut of the block that starts at file offset `target` (a multiple of PIECE_BYTES)."""
        relative = target - self.base
        boundary = self._line_boundary(relative)
        if boundary is None:
            match = _BOUNDARY.search(self.data, relative, relative + BOUND + 1)
            boundary = match.start() if match is not None else None
        if boundary is not None:
            return boundary + self.base
        for position in range(relative, min(relative + 4, len(self.data))):
            if not 0x80 <= self.data[position] < 0xC0:  # not a UTF-8 continuation byte
                return position + self.base
        return target


def file_window(handle: BinaryIO, size: int, start: int, end: int) -> Window:
    """The bytes a search between `start` and `end` needs: LOOKBACK before, BOUND after."""
    first = max(0, start - LOOKBACK - 2)
    last = min(size, end + BOUND + 2)
    handle.seek(first)
    return Window(handle.read(last - first), first, size)


def piece_cuts(window: Window, start: int, end: int) -> list[int]:
    """The cuts strictly inside (start, end), as file offsets. `start` is 0 or a cut, `end` a cut or
    the end of the file; `window` holds the file from `start` to BOUND + 2 bytes past `end`. (A run
    reaching back before `start` is not needed: `start` ends one, or lies PIECE_BYTES before the next
    boundary.)"""
    cuts = set(window.paragraph_cuts(start, end))
    for block in range(start // PIECE_BYTES + 1, (end - 1) // PIECE_BYTES + 1):
        cut = window.block_cut(block * PIECE_BYTES)
        if start < cut < end:
            cuts.add(cut)
    return sorted(cuts)


def range_boundary(handle: BinaryIO, size: int, target: int) -> int:
    """A cut at or after `target` (a multiple of PIECE_BYTES): the first paragraph boundary within
    PIECE_BYTES, else the block cut of `target`."""
    window = file_window(handle, size, target, target + PIECE_BYTES)
    paragraphs = window.paragraph_cuts(target - 1, target + PIECE_BYTES)
    return paragraphs[0] if paragraphs else window.block_cut(target)


def text_ranges(handle: BinaryIO, size: int, unit_bytes: int) -> list[tuple[int, int]]:
    """The file cut into byte ranges of about unit_bytes (a multiple of PIECE_BYTES), at cuts."""
    bounds = [0]
    for target in range(unit_bytes, size, unit_bytes):
        if target > bounds[-1]:
            bounds.append(range_boundary(handle, size, target))
    bounds.append(size)
    bounds = sorted(set(bounds))
    return list(zip(bounds, bounds[1:]))


def text_cuts(text: bytes) -> list[int]:
    """The cuts of a text held in memory (a long row of a table), as for a file holding it."""
    return piece_cuts(Window(text, 0, len(text)), 0, len(text))
