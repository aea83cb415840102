"""gqa-convert tokenize tried as a hostile user would, one test per class of problem: rows whose text is
not a string, folders reached through links, input of any shape (pieces stay small, cuts follow their
definition), files changed while they are read, OSErrors in this process and in workers, a damaged
token folder in the way, an empty corpus, and the messages themselves. Each refusal is one line
(GQAConvertError, exit 2 on the command line), the user's files are as they were and nothing partial is
left; where a rerun should resume, it gives the bytes an uninterrupted run gives."""

from __future__ import annotations

import errno
import io
import json
import os
import random
import resource
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from gqa_convert.data import cuts
from gqa_convert.data.readers import unit_documents
from gqa_convert.data.tokenize import TokenizeOptions, tokenize
from gqa_convert.data.tokens import TokenStream
from gqa_convert.data.units import Columns, plan_units
from gqa_convert.errors import GQAConvertError

from helpers import partial_leftovers, reference_cuts, snapshot

UNIT = 16 << 10
SAMPLE = Path(__file__).parent / "data" / "sample.txt"


def run(data: Path, out: Path, tokenizer_dir: Path, **overrides) -> dict:
    settings = {"unit_bytes": UNIT, "progress": False, "num_proc": 1, **overrides}
    return tokenize(str(data), out, TokenizeOptions(tokenizer=str(tokenizer_dir), **settings))


def refused(data: Path, out: Path, tokenizer_dir: Path, words: tuple[str, ...], **overrides) -> str:
    """Tokenizing is refused with one line holding `words`; the user's files are as they were and no
    output or work folder is left."""
    workspace = out.parent
    before = snapshot(workspace)
    with pytest.raises(GQAConvertError) as caught:
        run(data, out, tokenizer_dir, **overrides)
    message = str(caught.value)
    assert "\n" not in message and all(word in message for word in words), message
    assert not out.exists() and partial_leftovers(workspace) == []
    assert snapshot(workspace) == before
    return message


def ids(folder: Path) -> list[int]:
    stream = TokenStream(folder)
    return stream.read(0, len(stream)).tolist()


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _jsonl(rows: list) -> bytes:
    return "".join(json.dumps({"text": value}) + "\n" for value in rows).encode()


def _parquet(column) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    sink = io.BytesIO()
    pq.write_table(pa.table({"text": column}), sink)
    return sink.getvalue()


NOT_TEXT = {
    "jsonl-list-line-3": ("rows.jsonl", lambda: _jsonl(["one", "two", ["a", "b"]]), ("line 3", "holds a list")),
    "jsonl-object-first": ("rows.jsonl", lambda: _jsonl([{"k": 1}, "two"]), ("line 1", "holds an object")),
    "jsonl-number": ("rows.jsonl", lambda: _jsonl(["one", 3.5]), ("line 2", "holds a number")),
    "jsonl-bool": ("rows.jsonl", lambda: _jsonl(["one", True]), ("line 2", "true or false")),
    "jsonl-deep-in-a-worker": (
        "rows.jsonl",
        lambda: _jsonl(["some text " * 20] * 3000 + [[1, 2]]),
        ("line 3001", "holds a list"),
    ),
    "json-numbers": ("rows.json", lambda: _jsonl([1, 2]), ("row 1", "holds a number")),
    "csv-numbers": ("rows.csv", lambda: b"text\n12\n13\n", ("row 1", "holds a number")),
    "parquet-lists": ("rows.parquet", lambda: _parquet([["a"], ["b"]]), ("holds list",)),
    "parquet-integers": ("rows.parquet", lambda: _parquet([1, 2]), ("holds int64",)),
}


@pytest.mark.parametrize("case", NOT_TEXT, ids=list(NOT_TEXT))
def test_rows_whose_text_is_not_a_string_are_refused(case, tokenizer_dir, tmp_path):
    name, content, words = NOT_TEXT[case]
    (tmp_path / name).write_bytes(content())
    refused(tmp_path / name, tmp_path / "out", tokenizer_dir, (name, "not text", "--text-column", *words), num_proc=2)


def test_null_and_empty_cells_are_empty_documents(tokenizer_dir, tokenizer, tmp_path):
    (tmp_path / "rows.jsonl").write_bytes(_jsonl([None, "", "real text", "  ", None]))
    result = run(tmp_path / "rows.jsonl", tmp_path / "out", tokenizer_dir)
    eos = tokenizer.eos_token_id
    assert ids(tmp_path / "out") == encode(tokenizer, "real text") + [eos] + encode(tokenizer, "  ") + [eos]
    assert result["documents"] == 2


def test_links_are_followed_and_each_file_counted_once(tokenizer_dir, tokenizer, tmp_path):
    lines = SAMPLE.read_text().splitlines()
    corpus, outside = tmp_path / "corpus", tmp_path / "outside"
    (corpus / "b").mkdir(parents=True)
    outside.mkdir()
    texts = {"a.txt": lines[0], "b/c.txt": lines[1], "d.txt": lines[2], "e.txt": lines[3]}
    (corpus / "a.txt").write_text(texts["a.txt"])
    (corpus / "b" / "c.txt").write_text(texts["b/c.txt"])
    (outside / "d.txt").write_text(texts["d.txt"])
    (outside / "e.txt").write_text(texts["e.txt"])
    (corpus / "linked").symlink_to(outside, target_is_directory=True)  # a folder elsewhere
    (corpus / "loop").symlink_to(corpus, target_is_directory=True)  # a cycle back to the corpus
    (corpus / "z-again.txt").symlink_to(corpus / "a.txt")  # a second path to a file
    os.link(corpus / "b" / "c.txt", corpus / "hard.txt")  # and a hard link
    result = run(corpus, tmp_path / "out", tokenizer_dir)
    eos = tokenizer.eos_token_id
    expected = [t for name in ("a.txt", "b/c.txt", "d.txt", "e.txt") for t in encode(tokenizer, texts[name]) + [eos]]
    assert ids(tmp_path / "out") == expected and result["documents"] == 4
    assert [file["path"] for file in result["source"]["files"]] == ["a.txt", "b/c.txt", "linked/d.txt", "linked/e.txt"]


def _broken_link(corpus: Path) -> None:
    (corpus / "gone.txt").symlink_to(corpus / "nowhere.txt")


def _pipe(corpus: Path) -> None:
    os.mkfifo(corpus / "pipe.txt")


UNLISTABLE = {
    "broken-link": (_broken_link, ("gone.txt", "broken symbolic link")),
    "pipe": (_pipe, ("pipe.txt", "not a regular file")),
    "folder-we-may-not-list": (None, ("cannot list the folder", "sub", "Permission denied")),
}


@pytest.mark.parametrize("case", UNLISTABLE, ids=list(UNLISTABLE))
def test_what_cannot_be_read_in_a_corpus_folder_is_named_not_skipped(case, tokenizer_dir, tmp_path, monkeypatch):
    make, words = UNLISTABLE[case]
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    (corpus / "a.txt").write_text("some text")
    (corpus / "sub" / "b.txt").write_text("more text")
    if make is not None:
        make(corpus)
    else:  # root ignores permissions: the refusal is simulated where the folder is listed
        scandir = os.scandir

        def denied(path):
            if Path(path).name == "sub":
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))
            return scandir(path)

        monkeypatch.setattr(os, "scandir", denied)
    refused(corpus, tmp_path / "out", tokenizer_dir, words)


SHAPES = {
    "one-line-of-words": lambda n: b"word " * (n // 5),
    "no-whitespace": lambda n: b"x" * n,
    "multibyte-no-whitespace": lambda n: "\u6771".encode() * (n // 3),
    "only-line-breaks": lambda n: b"\n" * n,
    "only-spaces-then-text": lambda n: b" " * n + b"end",
    "non-breaking-spaces": lambda n: "a\u00a0".encode() * (n // 3),
    "crlf-lines-of-one-char": lambda n: b"a\r\n" * (n // 3),
}


@pytest.mark.parametrize("shape", SHAPES, ids=list(SHAPES))
def test_any_input_shape_is_read_in_small_pieces_with_bounded_memory(shape, tmp_path):
    """Every piece a worker hands the tokenizer is at most 2 x PIECE_BYTES + 3 bytes, the pieces put
    back together are the file, and reading a unit allocates about the unit, not the file (one long
    line was one piece before: a 10 MB line peaked at 2 GB)."""
    data = SHAPES[shape](2 << 20)
    (tmp_path / "corpus.raw").write_bytes(data)
    units = plan_units(str(tmp_path / "corpus.raw"), Columns(), 4 * UNIT)
    assert len(units) >= len(data) // (4 * UNIT) - 1
    pieces = []
    for unit in units:
        tracemalloc.start()
        unit_pieces = [text.encode() for text, _ in unit_documents(unit, Columns())]
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 8 * UNIT + (1 << 20), f"reading a {4 * UNIT}-byte unit allocated {peak} bytes"
        pieces += unit_pieces
    assert b"".join(pieces) == data
    assert max(map(len, pieces)) <= 2 * cuts.PIECE_BYTES + 3


@pytest.mark.parametrize("seed", range(3))
def test_the_cuts_follow_their_definition_whatever_the_unit_size(seed, monkeypatch):
    """The cuts found by the planner and the workers (bounded windows, regex scans) equal the
    definition applied position by position, for every unit size: so shard bytes never depend on it."""
    monkeypatch.setattr(cuts, "PIECE_BYTES", 64)
    monkeypatch.setattr(cuts, "BOUND", 64)
    monkeypatch.setattr(cuts, "LOOKBACK", 16)
    parts = [b"word", b"ab", b" ", b"\n", b"\r\n", b"  ", b"\n\n", b"\t", "\u00e9".encode(), "\u6771".encode()]
    parts += [b"\xc2\xa0", b" " * 40, b"\n" * 30, b"a" * 150, b"\n \n", b"x"]
    rng = random.Random(seed)
    for _ in range(120):
        data = b"".join(rng.choices(parts, [rng.random() for _ in parts], k=rng.randint(0, 120)))
        expected = reference_cuts(data)
        for unit in (64, 128, 640):
            handle, found = io.BytesIO(data), set()
            for start, end in cuts.text_ranges(handle, len(data), unit):
                found |= {start} - {0} | set(
                    cuts.piece_cuts(cuts.file_window(handle, len(data), start, end), start, end)
                )
            assert found == expected, (unit, data)


def test_a_long_line_gives_the_ids_of_one_call_and_the_same_bytes_for_any_split(tokenizer_dir, tokenizer, tmp_path):
    """A line without a line break is cut between words: byte-level BPE splits there anyway, so the ids
    are those of the whole line in one call; shard bytes do not depend on the unit size or processes."""
    words = [w for w in SAMPLE.read_text().split() if w]
    line = " ".join(words[i % len(words)] for i in range(12_000))  # about 80 kB, no line break
    (tmp_path / "line.txt").write_text(line)
    small = run(tmp_path / "line.txt", tmp_path / "small", tokenizer_dir)
    large = run(tmp_path / "line.txt", tmp_path / "large", tokenizer_dir, unit_bytes=4 * UNIT, num_proc=2)
    assert len(small["shards"]) > len(large["shards"]) >= 1
    assert ids(tmp_path / "small") == ids(tmp_path / "large") == encode(tokenizer, line) + [tokenizer.eos_token_id]
    (tmp_path / "row.jsonl").write_bytes(_jsonl([line, "short"]))  # a row's long text: cut the same way
    rows = run(tmp_path / "row.jsonl", tmp_path / "row", tokenizer_dir)
    eos = tokenizer.eos_token_id
    assert ids(tmp_path / "row") == encode(tokenizer, line) + [eos] + encode(tokenizer, "short") + [eos]
    assert rows["documents"] == 2


def _truncate(file: Path) -> None:
    os.truncate(file, file.stat().st_size // 2)


def _append(file: Path) -> None:
    with open(file, "a") as handle:
        handle.write("more")


def _rewrite_same_size(file: Path) -> None:
    status = file.stat()
    file.write_bytes(file.read_bytes()[::-1])
    os.utime(file, ns=(status.st_atime_ns, status.st_mtime_ns + 10**9))


def _replace(file: Path) -> None:
    other = file.with_name("other.tmp-new")
    other.write_bytes(file.read_bytes())
    other.replace(file)


CHANGES = {"truncated": _truncate, "appended": _append, "rewritten": _rewrite_same_size, "replaced": _replace}
CHANGES["deleted"] = lambda file: file.unlink()


@pytest.mark.parametrize("when", ["before-reading", "after-reading"])
@pytest.mark.parametrize("change", CHANGES, ids=list(CHANGES))
def test_a_file_changed_while_it_is_tokenized_is_refused(change, when, tokenizer_dir, tmp_path, monkeypatch):
    import gqa_convert.data.tokenize as tokenize_module

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text(SAMPLE.read_text() * 4)
    (corpus / "b.txt").write_text(SAMPLE.read_text())
    hooked = "plan_units" if when == "before-reading" else "run_units"
    original = getattr(tokenize_module, hooked)

    def then_change(*args, **kwargs):
        result = original(*args, **kwargs)
        CHANGES[change](corpus / "a.txt")
        return result

    monkeypatch.setattr(tokenize_module, hooked, then_change)
    with pytest.raises(GQAConvertError, match=r"a\.txt changed while it was tokenized") as caught:
        run(corpus, tmp_path / "out", tokenizer_dir, num_proc=2)
    assert "\n" not in str(caught.value)
    assert not (tmp_path / "out").exists() and partial_leftovers(tmp_path) == []


class _RefusingFile(io.FileIO):
    """A file whose writes fail with a given errno (a full disk, a read-only or failing device)."""

    code = errno.ENOSPC

    def write(self, data) -> int:
        raise OSError(self.code, os.strerror(self.code))


FIXES = {errno.ENOSPC: "free space", errno.EACCES: "writable", errno.EROFS: "writable", errno.EIO: "check the disk"}


@pytest.mark.parametrize("code", FIXES, ids=[errno.errorcode[code] for code in FIXES])
def test_a_write_refused_keeps_the_finished_units_and_a_rerun_resumes(code, tokenizer_dir, tmp_path, monkeypatch):
    import gqa_convert.data.worker as worker

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(5):
        (corpus / f"{i}.txt").write_text(SAMPLE.read_text()[i * 500 :])
    reference = run(corpus, tmp_path / "reference", tokenizer_dir)

    def failing_third_shard(path, mode="r", *args, **kwargs):
        if "shard-000002" in str(path) and "w" in mode:
            refusing = type("Refusing", (_RefusingFile,), {"code": code})
            return refusing(path, "w")
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(worker, "open", failing_third_shard, raising=False)
    with pytest.raises(GQAConvertError) as caught:
        run(corpus, tmp_path / "out", tokenizer_dir)
    message, staging = str(caught.value), tmp_path / ".out.partial"
    assert "\n" not in message and f"cannot write {staging} ({os.strerror(code)})" in message, message
    assert "the 2 finished units of 5" in message and FIXES[code] in message and "resumes" in message
    assert not (tmp_path / "out").exists()
    left = sorted(path.name for path in staging.iterdir())
    assert left == [".lock", "job.json", *(f"shard-00000{i}.{kind}" for i in range(2) for kind in ("json", "tokens"))]
    monkeypatch.undo()
    again = run(corpus, tmp_path / "out", tokenizer_dir)
    assert again["resumed_units"] == 2 and not staging.exists()
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "reference")
    assert again["tokens"] == reference["tokens"]


@pytest.mark.parametrize("code", [errno.EACCES, errno.EIO], ids=["EACCES", "EIO"])
def test_a_read_refused_is_one_line_naming_the_file(code, tokenizer_dir, tmp_path, monkeypatch):
    import gqa_convert.data.readers as readers

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("first file")
    (corpus / "b.txt").write_text("second file")

    def refusing(path, mode="r", *args, **kwargs):
        if Path(path).name == "b.txt":
            raise OSError(code, os.strerror(code), str(path))
        return open(path, mode, *args, **kwargs)

    monkeypatch.setattr(readers, "open", refusing, raising=False)
    before = snapshot(corpus)
    with pytest.raises(GQAConvertError) as caught:
        run(corpus, tmp_path / "out", tokenizer_dir)
    message = str(caught.value)
    assert f"cannot read {corpus / 'b.txt'} ({os.strerror(code)})" in message and "\n" not in message
    assert ("readable" if code == errno.EACCES else "check the disk") in message
    assert "the 1 finished units of 2" in message  # a.txt's shard, for a rerun to resume
    assert snapshot(corpus) == before and not (tmp_path / "out").exists()


def test_a_full_disk_in_worker_processes_is_one_line_and_a_rerun_resumes(tokenizer_dir, tmp_path):
    """Worker processes (a pool of 2) meet a file size limit (EFBIG, as a full disk would refuse them):
    one line on stderr, exit 2, the finished units kept; a rerun without the limit resumes them."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(4):
        (corpus / f"{i}.txt").write_text(SAMPLE.read_text())
    (corpus / "z-large.txt").write_text(SAMPLE.read_text() * 40)  # its shard passes the limit
    command = [sys.executable, "-m", "gqa_convert.cli", "tokenize", str(corpus), "-o", str(tmp_path / "out")]
    command += ["--tokenizer", str(tokenizer_dir), "--num-proc", "2"]

    def limit_file_size() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (20_000, resource.RLIM_INFINITY))

    limited = subprocess.run(command, capture_output=True, text=True, timeout=300, preexec_fn=limit_file_size)
    assert limited.returncode == 2, limited.stderr
    assert limited.stderr.count("\n") == 1 and limited.stderr.startswith("error: cannot write"), limited.stderr
    assert "File too large" in limited.stderr and "the 4 finished units of 5" in limited.stderr
    assert not (tmp_path / "out").exists() and not list((tmp_path / ".out.partial").glob(".*.tmp"))
    rerun = run(corpus, tmp_path / "out", tokenizer_dir, num_proc=2, unit_bytes=None)  # the command's settings
    reference = run(corpus, tmp_path / "reference", tokenizer_dir, unit_bytes=None)
    assert rerun["resumed_units"] == 4 and reference["documents"] == 5
    assert snapshot(tmp_path / "out") == snapshot(tmp_path / "reference")


def test_a_manifest_write_refused_keeps_every_unit(tokenizer_dir, tmp_path, monkeypatch):
    import gqa_convert.data.staging as staging_module

    (tmp_path / "a.txt").write_text(SAMPLE.read_text())
    original = staging_module.write_json_atomic

    def full_at_the_manifest(path, value):
        if path.name == "manifest.json":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        return original(path, value)

    monkeypatch.setattr(staging_module, "write_json_atomic", full_at_the_manifest)
    with pytest.raises(GQAConvertError, match=r"the 1 finished units of 1 .* free space"):
        run(tmp_path / "a.txt", tmp_path / "out", tokenizer_dir)
    monkeypatch.undo()
    assert run(tmp_path / "a.txt", tmp_path / "out", tokenizer_dir)["resumed_units"] == 1


def _cut_in_half(manifest: Path) -> None:
    manifest.write_bytes(manifest.read_bytes()[: manifest.stat().st_size // 2])


def _field(name: str, value):
    def tamper(manifest: Path) -> None:
        record = json.loads(manifest.read_text())
        record[name] = value
        manifest.write_text(json.dumps(record))

    return tamper


DAMAGED_ON_RERUN = {
    "truncated": (_cut_in_half, "not valid JSON"),
    "empty": (lambda manifest: manifest.write_bytes(b""), "not valid JSON"),
    "binary": (lambda manifest: manifest.write_bytes(b"\xff\xfe\x00garbage"), "not valid JSON"),
    "tokens-a-string": (_field("tokens", "many"), "'tokens' is 'many'"),
    "dtype-float16": (_field("dtype", "float16"), "dtype 'float16'"),
}


@pytest.mark.parametrize("case", DAMAGED_ON_RERUN, ids=list(DAMAGED_ON_RERUN))
def test_a_rerun_onto_a_damaged_token_folder_is_one_line(case, tokenizer_dir, tmp_path):
    tamper, why = DAMAGED_ON_RERUN[case]
    (tmp_path / "a.txt").write_text(SAMPLE.read_text())
    run(tmp_path / "a.txt", tmp_path / "out", tokenizer_dir)
    tamper(tmp_path / "out" / "manifest.json")
    before = snapshot(tmp_path)
    for force in (False, True):
        with pytest.raises(GQAConvertError) as caught:
            run(tmp_path / "a.txt", tmp_path / "out", tokenizer_dir, force=force)
        message = str(caught.value)
        assert "holds a damaged token folder" in message and why in message and "delete it" in message, message
        assert snapshot(tmp_path) == before and partial_leftovers(tmp_path) == []


EMPTY = {
    "empty-file": lambda corpus: (corpus / "a.txt").write_bytes(b""),
    "empty-files": lambda corpus: [(corpus / f"{i}.txt").write_bytes(b"") for i in range(3)],
    "empty-rows": lambda corpus: (corpus / "rows.jsonl").write_bytes(_jsonl([None, "", None])),
    "empty-parquet": lambda corpus: (corpus / "rows.parquet").write_bytes(_parquet(pa_strings([]))),
}


def pa_strings(values: list):
    import pyarrow as pa

    return pa.array(values, type=pa.string())


@pytest.mark.parametrize("case", [*EMPTY, "hidden-only"])
def test_an_empty_corpus_is_refused_not_written_as_zero_tokens(case, tokenizer_dir, tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    if case == "hidden-only":
        (corpus / ".notes.txt").write_text("hidden")
        words = ("holds no data files",)
    else:
        EMPTY[case](corpus)
        words = ("holds no text to tokenize", "give a corpus with text")
    refused(corpus, tmp_path / "out", tokenizer_dir, (str(corpus), *words), num_proc=2)


def test_the_command_line_prints_one_line_and_names_what_is_wrong(tokenizer_dir, tmp_path):
    from typer.testing import CliRunner

    from gqa_convert.cli import app

    rows = tmp_path / "rows.jsonl"
    rows.write_bytes(_jsonl(["text " * 50] * 2000 + [{"a": 1}]))  # refused while a unit is tokenized
    (tmp_path / "good.txt").write_text("some text")
    run(tmp_path / "good.txt", tmp_path / "tokens", tokenizer_dir)
    cases = {
        "bad-row": ([str(rows), "--tokenizer", str(tokenizer_dir)], "line 2001"),
        "missing-tokenizer": ([str(rows), "--tokenizer", str(tmp_path / "nowhere")], "does not exist"),
        "token-folder-as-data": ([str(tmp_path / "tokens"), "--tokenizer", str(tokenizer_dir)], "is a token folder"),
        "empty-data-path": (["", "--tokenizer", str(tokenizer_dir)], "the data path is empty"),
    }
    for name, (arguments, words) in cases.items():
        result = CliRunner().invoke(app, ["tokenize", *arguments, "-o", str(tmp_path / name)])
        assert result.exit_code == 2 and result.stderr.startswith("error: "), (name, result.stderr)
        assert result.stderr.count("\n") == 1 and words in result.stderr, (name, result.stderr)
        assert not (tmp_path / name).exists()


@pytest.mark.parametrize("kind", ["link-to-a-folder", "file"])
def test_a_staging_path_that_is_not_our_folder_is_left_alone(kind, tokenizer_dir, tmp_path):
    (tmp_path / "a.txt").write_text("some text")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    staging = tmp_path / ".out.partial"
    if kind == "file":
        staging.write_text("mine")
    else:
        staging.symlink_to(elsewhere, target_is_directory=True)
    before = snapshot(tmp_path)
    with pytest.raises(GQAConvertError, match="is not a folder gqa-convert tokenize made: move it away"):
        run(tmp_path / "a.txt", tmp_path / "out", tokenizer_dir)
    assert snapshot(tmp_path) == before and not (tmp_path / "out").exists()


def test_token_ids_are_recorded_and_fit_the_dtype(tokenizer_dir, tmp_path):
    (tmp_path / "a.txt").write_text(SAMPLE.read_text())
    result = run(tmp_path / "a.txt", tmp_path / "out", tokenizer_dir)
    assert result["max_token_id"] == int(np.max(ids(tmp_path / "out")))
