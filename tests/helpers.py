"""Helpers shared by the hostile tests of the data surfaces: the cut rules written out independently
(a brute-force reading of the definition in gqa_convert.data.cuts), and what a folder holds, to show
that nothing of the user's was lost and nothing partial was left."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from gqa_convert.data import cuts

_WHITESPACE = set(b"\t\n\x0b\x0c\r ")
_VISIBLE = re.compile(rb"[!-~\xc3-\xe0\xe4-\xf4]")


def reference_cuts(data: bytes) -> set[int]:
    """Every cut of a file holding `data`, position by position from the definition (slow: small
    files, with the module's sizes made small)."""
    piece, bound, lookback = cuts.PIECE_BYTES, cuts.BOUND, cuts.LOOKBACK

    def boundary(p: int) -> bool:
        return data[p] in _WHITESPACE and p + 1 < len(data) and _VISIBLE.match(data, p + 1) is not None

    def breaks(p: int) -> int:
        start = p
        while start > 0 and data[start - 1] in _WHITESPACE:
            start -= 1
        return data.count(b"\n", max(start, p - lookback + 1), p + 1)

    found = {p for p in range(len(data)) if boundary(p) and breaks(p) >= 2}
    for target in range(piece, len(data), piece):
        window = range(target, min(target + bound, len(data)))
        line = next((p for p in window if boundary(p) and breaks(p) >= 1), None)
        word = next((p for p in window if boundary(p)), None)
        char = next((p for p in range(target, min(target + 4, len(data))) if not 0x80 <= data[p] < 0xC0), target)
        found.add(line if line is not None else word if word is not None else char)
    return {cut for cut in found if 0 < cut < len(data)}


def folder_digest(folder: Path) -> dict[str, str]:
    """Every file under `folder` (links not followed) with the sha256 of its bytes or its link target."""
    digest = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            digest[name] = "link -> " + str(path.readlink())
        elif path.is_file():
            digest[name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return digest


def partial_leftovers(folder: Path) -> list[str]:
    """Names of work folders or temporary files left anywhere under `folder`."""
    pattern = re.compile(r"\.(partial|old|tmp)$|\.tmp-|\.data-|\.dry-run-")
    return sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if pattern.search(path.name))
