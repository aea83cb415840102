"""Build reproducible texts of other domains than encyclopedic prose, with no network, for
scripts/research/ablation.py (--ood-text, --calib-extra):

- `--kind readme` (technical documentation): the long descriptions (README bodies, markdown/rst) in
  the METADATA files of installed Python packages, one package after another in name order,
  de-duplicated by paragraph;
- `--kind code`: the top-level modules of Python's standard library, in name order.

    python scripts/research/make_ood_text.py [--kind readme|code] [--out ood.txt] [--max-chars N]

Rules for readme (all deterministic): the METADATA body is what follows the first blank line (the e-mail style
headers are dropped); lines that are only badges, images, HTML tags or link targets are dropped;
paragraphs (blank-line separated) are de-duplicated on their whitespace-normalised, lower-cased text
across all packages; each package contributes at most --max-chars-per-package characters (whole
paragraphs), so no single long changelog dominates; --exclude names packages to skip (default: the
project itself, whose README talks about the method being evaluated).
"""

from __future__ import annotations

import argparse
import hashlib
import re
from pathlib import Path

NOISE = re.compile(
    r"^\s*(\[!\[|!\[|<(/?)(img|a|p|div|picture|source|br|h\d|center|table|tr|td)\b|\.\. (image|figure|\|)|"
    r"\[[^\]]+\]:\s*http|:target:|:alt:|:width:|:height:|:align:)",
    re.IGNORECASE,
)


def metadata_body(path: Path) -> str:
    """The long description: everything after the header block."""
    text = path.read_text(encoding="utf-8", errors="replace")
    _, _, body = text.partition("\n\n")
    return body


def clean_paragraphs(body: str) -> list[str]:
    lines = [line.rstrip() for line in body.splitlines() if not NOISE.match(line)]
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line)
        elif current:
            paragraphs.append("\n".join(current))
            current = []
    if current:
        paragraphs.append("\n".join(current))
    return [p for p in paragraphs if len(re.sub(r"\W", "", p)) >= 20]  # drop rulers and near-empty bits


def build(site_packages: Path, max_chars: int, exclude: set[str]) -> str:
    seen: set[str] = set()
    parts = []
    for metadata in sorted(site_packages.glob("*.dist-info/METADATA"), key=lambda p: p.parent.name.lower()):
        name = metadata.parent.name.split("-")[0].lower()
        if name in exclude:
            continue
        taken, size = [], 0
        for paragraph in clean_paragraphs(metadata_body(metadata)):
            key = hashlib.sha1(" ".join(paragraph.lower().split()).encode()).hexdigest()
            if key in seen:
                continue
            if size + len(paragraph) > max_chars:
                break
            seen.add(key)
            taken.append(paragraph)
            size += len(paragraph)
        if taken:
            parts.append("\n\n".join(taken))
    return "\n\n".join(parts) + "\n"


def standard_library_code(stdlib: Path) -> str:
    return "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted(stdlib.glob("*.py")))


def main() -> None:
    import sysconfig

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kind", choices=("readme", "code"), default="readme")
    parser.add_argument("--site-packages", type=Path, default=Path(sysconfig.get_paths()["purelib"]))
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]))
    parser.add_argument("--out", type=Path, default=Path("ood.txt"))
    parser.add_argument("--max-chars-per-package", type=int, default=20000)
    parser.add_argument("--exclude", default="gqa_convert,gqa-convert")
    parser.add_argument("--max-chars", type=int, default=0, help="keep the first N characters (0: all)")
    args = parser.parse_args()
    if args.kind == "code":
        text = standard_library_code(args.stdlib)
    else:
        text = build(args.site_packages, args.max_chars_per_package, set(args.exclude.split(",")))
    if args.max_chars:
        text = text[: args.max_chars]
    args.out.write_text(text, encoding="utf-8")
    print(f"{args.out}: {len(text):,} characters, sha1 {hashlib.sha1(text.encode()).hexdigest()[:12]}")


if __name__ == "__main__":
    main()
