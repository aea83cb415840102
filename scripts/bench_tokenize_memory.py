"""Peak memory of `gqa-convert tokenize` on input of a hostile shape: one file of SIZE_MB that is a single
line (words, no line break), or no whitespace at all.

Prints the peak resident set of the largest process (what `/usr/bin/time -v` reports as "Maximum resident
set size") and the peak of the whole process tree summed (the main process, the forkserver and every
worker), sampled every 50 ms from /proc.

    python scripts/bench_tokenize_memory.py --tokenizer MODEL [--size-mb 50] [--shape line|nospace] [--num-proc N]
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SHAPES = {"line": b"abcdefgh ", "nospace": b"abcdefghi"}


def _children() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                parent = int(Path(f"/proc/{name}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(parent, []).append(int(name))
    return tree


def _resident(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def tree_resident(root: int) -> tuple[int, int]:
    """(summed, largest) resident bytes of `root` and its descendants."""
    tree, todo, sizes = _children(), [root], []
    while todo:
        pid = todo.pop()
        sizes.append(_resident(pid))
        todo += tree.get(pid, [])
    return sum(sizes), max(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--size-mb", type=int, default=50)
    parser.add_argument("--shape", choices=SHAPES, default="line")
    parser.add_argument("--num-proc", type=int, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-tokenize-memory-"))
    try:
        corpus = work / "corpus.txt"
        unit = SHAPES[args.shape]
        corpus.write_bytes(unit * (args.size_mb * 1_000_000 // len(unit)))
        command = [sys.executable, "-m", "gqa_convert.cli", "tokenize", str(corpus), "-o", str(work / "tokens")]
        command += ["--tokenizer", args.tokenizer]
        command += ["--num-proc", str(args.num_proc)] if args.num_proc else []
        started = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.PIPE)
        summed = largest = 0
        while process.poll() is None:
            now_summed, now_largest = tree_resident(process.pid)
            summed, largest = max(summed, now_summed), max(largest, now_largest)
            time.sleep(0.05)
        seconds = time.perf_counter() - started
        output = process.stdout.read().decode() if process.stdout else ""
        if process.returncode:
            sys.exit(f"tokenize failed with exit code {process.returncode}")
        rusage_peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
        print(output.strip())
        print(
            f"{args.size_mb} MB, shape {args.shape}: largest process {max(largest, rusage_peak) / 1e6:.0f} MB "
            f"(getrusage {rusage_peak / 1e6:.0f} MB), process tree summed {summed / 1e6:.0f} MB, {seconds:.1f} s"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
