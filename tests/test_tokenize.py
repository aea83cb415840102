"""gqa-convert tokenize: parallel shards equal a single-process tokenization token for token (text
files cut into ranges, jsonl, parquet, folders, Hub shards), kill -9 and rerun equals one run, the
block stream across shards, and the per-epoch order: a bijection, a pure function, O(1) memory."""

from __future__ import annotations

import fcntl
import json
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from gqa_convert.data.manifest import build_manifest, read_manifest
from gqa_convert.data.permutation import BlockOrder
from gqa_convert.data.tokenize import TokenizeOptions, tokenize
from gqa_convert.data.tokens import TokenBlocks, TokenStream
from gqa_convert.errors import GQAConvertError

SAMPLE = Path(__file__).parent / "data" / "sample.txt"
UNIT = 16 << 10  # the smallest unit: every range boundary is tested many times over


def corpus_text(paragraphs: int, seed: int = 0) -> str:
    """Paragraphs of the sample with the whitespace a real corpus has: blank lines, CRLF, indented
    lines, runs of spaces and tabs, non-ASCII text, and long stretches without a blank line."""
    rng = np.random.default_rng(seed)
    lines = [line for line in SAMPLE.read_text().splitlines() if line.strip()]
    separators = ["\n\n", "\n", "\r\n\r\n", "\n \n ", "\n\n\n", " \n\t\n", "\n    ", "  \n\n", "\n\n\u00e9t\u00e9 "]
    parts = []
    for i in range(paragraphs):
        parts.append(" ".join(lines[(i + k) % len(lines)] for k in range(int(rng.integers(1, 6)))))
        parts.append(separators[int(rng.integers(len(separators)))])
    return "".join(parts)


def shard_ids(folder: Path) -> list[int]:
    stream = TokenStream(folder)
    return stream.read(0, len(stream)).tolist()


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def options(tokenizer_dir: Path, **overrides) -> TokenizeOptions:
    return TokenizeOptions(tokenizer=str(tokenizer_dir), unit_bytes=UNIT, progress=False, **overrides)


def test_a_text_file_cut_into_ranges_equals_the_whole_file_in_one_call(tokenizer_dir, tokenizer, tmp_path):
    text = corpus_text(900)
    file = tmp_path / "corpus.raw"
    file.write_bytes(text.encode())  # bytes as they are: CRLF stays CRLF
    result = tokenize(str(file), tmp_path / "tokens", options(tokenizer_dir, num_proc=2))
    assert len(result["shards"]) >= 8, "the file must be split into many ranges"
    assert shard_ids(tmp_path / "tokens") == encode(tokenizer, text) + [tokenizer.eos_token_id]
    assert result["documents"] == 1 and sum(s["documents"] for s in result["shards"]) == 1
    assert result["dtype"] == "uint16" and result["eos_token_id"] == tokenizer.eos_token_id
    assert result["source"]["files"][0]["size"] == len(text.encode())


def test_tables_and_folders_equal_a_single_process_reference(tokenizer_dir, tokenizer, tmp_path):
    rows = [{"text": corpus_text(3, seed=i), "id": i} for i in range(400)]
    rows[5]["text"] = ""  # empty documents are skipped, as before
    jsonl = tmp_path / "jsonl"
    jsonl.mkdir()
    (jsonl / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:300]))  # split at lines
    (jsonl / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows[300:]))  # no final newline
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "one.txt").write_bytes(corpus_text(40, seed=1).encode())
    (texts / "two").write_bytes(corpus_text(400, seed=2).encode())
    eos = tokenizer.eos_token_id
    expected_rows = [t for r in rows if r["text"] for t in encode(tokenizer, r["text"]) + [eos]]
    result = tokenize(str(jsonl), tmp_path / "jsonl-tokens", options(tokenizer_dir))
    assert len(result["shards"]) >= 4 and result["documents"] == 399
    assert shard_ids(tmp_path / "jsonl-tokens") == expected_rows
    expected_texts = [
        t for f in ("one.txt", "two") for t in encode(tokenizer, (texts / f).read_bytes().decode()) + [eos]
    ]
    result = tokenize(str(texts), tmp_path / "text-tokens", options(tokenizer_dir, num_proc=2))
    assert shard_ids(tmp_path / "text-tokens") == expected_texts and result["documents"] == 2


def test_parquet_row_groups_and_hub_shards(tokenizer_dir, tokenizer, tmp_path, monkeypatch):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    texts = [corpus_text(2, seed=i) for i in range(120)]
    pq.write_table(pa.table({"body": texts}), tmp_path / "rows.parquet", row_group_size=7)
    result = tokenize(str(tmp_path / "rows.parquet"), tmp_path / "pq", options(tokenizer_dir, text_column="body"))
    eos = tokenizer.eos_token_id
    assert result["source"]["units"] > 1
    assert shard_ids(tmp_path / "pq") == [t for text in texts for t in encode(tokenizer, text) + [eos]]

    shards = []
    for i in range(3):  # a streamed dataset of three shards stands in for the Hub
        shards.append(tmp_path / f"hub-{i}.jsonl")
        shards[-1].write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[40 * i : 40 * i + 40]))
    stream = datasets.load_dataset("json", data_files=[str(s) for s in shards], split="train", streaming=True)
    for module in ("units", "readers"):  # the planner and the reader
        monkeypatch.setattr(f"gqa_convert.data.{module}.load_hub", lambda name, config, split: stream)
    result = tokenize("org/corpus", tmp_path / "hub", options(tokenizer_dir, num_proc=1))
    assert [shard["documents"] for shard in result["shards"]] == [40, 40, 40]
    assert shard_ids(tmp_path / "hub") == [t for text in texts for t in encode(tokenizer, text) + [eos]]


def _tokenize_command(data: Path, out: Path, tokenizer_dir: Path) -> list[str]:
    code = (
        "import sys, json; from gqa_convert.data.tokenize import TokenizeOptions, tokenize; "
        f"print(json.dumps(tokenize(sys.argv[1], sys.argv[2], TokenizeOptions(tokenizer=sys.argv[3], num_proc=2, "
        f"unit_bytes={UNIT}, progress=False))['resumed_units']))"
    )
    return [sys.executable, "-c", code, str(data), str(out), str(tokenizer_dir)]


def test_kill_9_then_rerun_equals_an_uninterrupted_run(tokenizer_dir, tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text(corpus_text(12000))  # about 300 units
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    subprocess.run(_tokenize_command(data, reference, tokenizer_dir), check=True, capture_output=True, timeout=600)

    process = subprocess.Popen(
        _tokenize_command(data, killed, tokenizer_dir), start_new_session=True, stdout=subprocess.DEVNULL
    )
    staging = tmp_path / ".killed.partial"
    deadline = time.time() + 300
    while time.time() < deadline and len(list(staging.glob("shard-*.json"))) < 20:
        time.sleep(0.01)
    os.killpg(process.pid, signal.SIGKILL)  # the main process and its workers, as when a machine dies
    process.wait()
    assert not killed.exists() and 20 <= len(list(staging.glob("shard-*.json"))) < 300

    rerun = subprocess.run(_tokenize_command(data, killed, tokenizer_dir), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert int(rerun.stdout.split()[-1]) >= 20, "the rerun must keep the finished units"
    assert not staging.exists()
    assert (killed / "manifest.json").read_text() == (reference / "manifest.json").read_text()
    assert sorted(p.name for p in killed.iterdir()) == sorted(p.name for p in reference.iterdir())
    for shard in read_manifest(reference)["shards"]:
        assert (killed / shard["file"]).read_bytes() == (reference / shard["file"]).read_bytes()


def test_reruns_outputs_and_bad_input(tokenizer_dir, tmp_path):
    data = tmp_path / "corpus.txt"
    data.write_text(corpus_text(300))
    out = tmp_path / "out"
    first = tokenize(str(data), out, options(tokenizer_dir))
    again = tokenize(str(data), out, options(tokenizer_dir))  # the same job, finished: nothing to do
    assert again == read_manifest(out) and "seconds" not in again and "seconds" in first
    with pytest.raises(GQAConvertError, match="not empty: pass --force"):
        tokenize(str(data), out, options(tokenizer_dir, text_column="body"))
    capped = tokenize(str(data), out, options(tokenizer_dir, max_tokens=5000, force=True))
    listed = capped["shards"]
    assert sum(s["tokens"] for s in listed[:-1]) < 5000 <= capped["tokens"] < first["tokens"]
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", *(s["file"] for s in listed)])

    staging = tmp_path / ".busy.partial"  # a run in progress holds the lock of its staging folder
    staging.mkdir()
    with open(staging / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(GQAConvertError, match="another tokenization is writing"):
            tokenize(str(data), tmp_path / "busy", options(tokenizer_dir, force=True))
    assert [p.name for p in staging.iterdir()] == [".lock"], "the other run's folder is left alone"
    staging.joinpath(".lock").unlink()
    staging.rmdir()

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"content": "hello"}\n')
    with pytest.raises(GQAConvertError, match="no column 'text'"):
        tokenize(str(rows), tmp_path / "t1", options(tokenizer_dir))
    late = tmp_path / "late.raw"
    late.write_bytes(b"word " * 40_000 + b"\xff")  # past the head that is checked up front
    with pytest.raises(GQAConvertError, match=r"late\.raw is not UTF-8 text \(byte 200000\)"):
        tokenize(str(late), tmp_path / "t2", options(tokenizer_dir))
    folder = tmp_path / "texts"
    folder.mkdir()
    (folder / "a.txt").write_text("some text")
    with pytest.raises(GQAConvertError, match="inside the input folder"):
        tokenize(str(folder), folder / "tokens", options(tokenizer_dir))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus.txt", "late.raw", "out", "rows.jsonl", "texts"]
    assert [p.name for p in folder.iterdir()] == ["a.txt"]


def _token_folder(folder: Path, sizes: list[int]) -> np.ndarray:
    """A token folder by hand: shards of the given sizes holding 0, 1, 2, ... in order."""
    folder.mkdir()
    ids = np.arange(sum(sizes), dtype=np.uint32)
    shards, start = [], 0
    for i, size in enumerate(sizes):
        ids[start : start + size].tofile(folder / f"s{i}.tokens")
        shards.append({"file": f"s{i}.tokens", "tokens": size, "documents": 0})
        start += size
    identity = {"fingerprint": "x", "name_or_path": "", "vocab_size": 1 << 20, "eos_token_id": 0}
    (folder / "manifest.json").write_text(json.dumps(build_manifest(shards, identity, "uint32", {})))
    return ids


def test_blocks_span_shard_boundaries(tmp_path):
    ids = _token_folder(tmp_path / "t", [5, 3, 0, 7, 1, 10, 4])
    stream = TokenStream(tmp_path / "t")
    for start in range(len(ids)):
        for length in range(len(ids) - start + 1):
            assert stream.read(start, length).tolist() == ids[start : start + length].tolist()
    blocks = TokenBlocks(tmp_path / "t", seq_len=4, seed=3)
    assert blocks.num_blocks == 7  # 30 tokens: the last 2 are unused
    for epoch in range(3):
        seen = [blocks.block(epoch * 7 + i) for i in range(7)]
        firsts = sorted(int(block[0]) for block in seen)
        assert firsts == [0, 4, 8, 12, 16, 20, 24], "each block once per epoch"
        assert all(block.tolist() == list(range(block[0], block[0] + 4)) for block in seen)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 13, 31, 64, 97, 256, 257, 1000, 1021, 4099])
def test_the_epoch_order_is_a_bijection(n):
    order = BlockOrder(n, seed=11)
    for epoch in (0, 1, 7):
        assert sorted(order(epoch, i) for i in range(n)) == list(range(n))


def test_the_epoch_order_is_a_pure_function_and_shuffles():
    n = 1000
    forward = [BlockOrder(n, 5)(2, i) for i in range(n)]
    fresh = BlockOrder(n, 5)
    backward = [fresh(2, i) for i in reversed(range(n))][::-1]
    interleaved = BlockOrder(n, 5)
    mixed = [interleaved(epoch, i) for i in range(n) for epoch in (9, 2)][1::2]
    assert forward == backward == mixed, "(seed, epoch, index) alone decides the block"
    assert forward != [BlockOrder(n, 5)(3, i) for i in range(n)] != [BlockOrder(n, 6)(2, i) for i in range(n)]
    assert sum(a == i for i, a in enumerate(forward)) < 10 and np.corrcoef(range(n), forward)[0, 1] ** 2 < 0.01
    with pytest.raises(IndexError):
        BlockOrder(n, 5)(0, n)


def _largest(value: object, depth: int = 0) -> int:
    """The size of the largest array or container an object holds (through attributes and containers)."""
    if isinstance(value, np.ndarray):
        return value.size
    if depth > 3:
        return 0
    if isinstance(value, dict):
        return max([len(value), *(_largest(v, depth + 1) for v in value.values())])
    if isinstance(value, (list, tuple, set)):
        return max([len(value), *(_largest(v, depth + 1) for v in value)])
    if hasattr(value, "__dict__") and not isinstance(value, type):
        return max([0, *(_largest(v, depth + 1) for v in vars(value).values())])
    return 0


def test_the_shuffle_memory_does_not_grow_with_the_number_of_blocks(tmp_path):
    small, huge = BlockOrder(10, 0), BlockOrder(10**15, 0)
    huge(4, 10**15 - 1), small(4, 9)
    assert len(pickle.dumps(huge)) - len(pickle.dumps(small)) < 16  # only the digits of n differ
    assert _largest(huge) == 6  # the round keys
    _token_folder(tmp_path / "t", [40_000, 40_000])
    blocks = TokenBlocks(tmp_path / "t", seq_len=2, seed=0)
    for index in range(0, 3 * blocks.num_blocks, 997):
        blocks.block(index)
    assert blocks.num_blocks == 40_000
    # the shards are mapped (the tokens themselves); beside them nothing has an entry per block
    besides_shards = {name: value for name, value in vars(blocks).items() if name != "stream"}
    assert _largest(besides_shards) == 6 and len(blocks.stream.starts) == 3


def test_the_command_line(tokenizer_dir, tmp_path):
    from typer.testing import CliRunner

    from gqa_convert.cli import app

    data = tmp_path / "corpus.txt"
    data.write_text(corpus_text(50))
    command = ["tokenize", str(data), "-o", str(tmp_path / "tokens"), "--tokenizer", str(tokenizer_dir)]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["tokens"] == read_manifest(tmp_path / "tokens")["tokens"] > 0 and summary["shards"] == 1
    for extra, message in (("--num-proc=0", "--num-proc must be at least 1"), ("--max-tokens=lots", "not understood")):
        result = CliRunner().invoke(app, [*command, extra])
        assert result.exit_code == 2 and message in result.output, result.output


@pytest.mark.slow
def test_the_smollm2_gguf_tokenizer_is_the_converted_folders_and_ranges_equal_one_call(tmp_path):
    """The GGUF's tokenizer and the one `expand` writes beside the weights share the fingerprint, and
    the real byte-level BPE gives the same ids in ranges as for the whole file."""
    from gqa_convert.data.manifest import check_tokenizer
    from gqa_convert.surgery.convert import expand

    from real_model import smollm2_gguf

    gguf = smollm2_gguf()
    expand(gguf, tmp_path / "mha")
    text = corpus_text(2500)
    (tmp_path / "corpus.txt").write_bytes(text.encode())
    options = TokenizeOptions(tokenizer=str(gguf), unit_bytes=UNIT, num_proc=2, progress=False)
    result = tokenize(str(tmp_path / "corpus.txt"), tmp_path / "tokens", options)
    converted = AutoTokenizer.from_pretrained(tmp_path / "mha")
    check_tokenizer(read_manifest(tmp_path / "tokens"), converted, "tokens", "mha")  # raises if they differ
    assert len(result["shards"]) > 4 and result["dtype"] == "uint16"
    assert shard_ids(tmp_path / "tokens") == encode(converted, text) + [converted.eos_token_id]


def test_the_job_is_the_same_wherever_the_corpus_is_mounted(tokenizer_dir, tokenizer, tmp_path):
    """Machines that mount a shared corpus at different paths agree on OUT/data/<fingerprint>; a
    changed file changes it."""
    import shutil

    from gqa_convert.data.manifest import tokenizer_info
    from gqa_convert.data.tokenize import describe_job, job_fingerprint

    here = tmp_path / "mnt-a" / "corpus"
    here.mkdir(parents=True)
    (here / "x.txt").write_text(corpus_text(20))
    (here / "y.txt").write_text(corpus_text(30))
    there = Path(shutil.copytree(here, tmp_path / "mnt-b" / "corpus"))  # copies keep their mtimes
    info = tokenizer_info(tokenizer)

    def fingerprint(data: Path) -> str:
        return job_fingerprint(describe_job(str(data), info, options(tokenizer_dir)))

    assert fingerprint(here) == fingerprint(there)
    stat = (there / "y.txt").stat()
    os.utime(there / "y.txt", ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert fingerprint(here) != fingerprint(there)
