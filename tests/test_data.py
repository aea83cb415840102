"""Data files: any file that is not a table is UTF-8 text (WikiText's .raw included), tables by their
suffix, folders of one kind; invalid input is refused with one line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from gqa_convert.data.text import check_data, iter_documents, read_text
from gqa_convert.errors import GQAConvertError

SAMPLE = Path(__file__).parent / "data" / "sample.txt"


@pytest.mark.parametrize("name", ["wiki.test.raw", "notes", "corpus.md", "data.TXT"])
def test_any_non_table_file_is_read_as_text_exactly(tmp_path, name):
    file = tmp_path / name
    file.write_text(SAMPLE.read_text())
    check_data(file)
    assert read_text(file) == SAMPLE.read_text()


def test_tables_by_suffix_and_folders_of_one_kind(tmp_path):
    (tmp_path / "rows.jsonl").write_text(json.dumps({"text": "first"}) + "\n" + json.dumps({"text": "second"}) + "\n")
    (tmp_path / "rows.csv").write_text("text,other\nthird,x\n")
    assert [text for text, _ in iter_documents(tmp_path / "rows.jsonl")] == ["first", "second"]
    assert [text for text, _ in iter_documents(tmp_path / "rows.csv")] == ["third"]
    with pytest.raises(GQAConvertError, match="mixes file types"):
        check_data(tmp_path)
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "a.raw").write_text("alpha")
    (texts / "b").write_text("beta")
    (texts / ".hidden").write_bytes(b"\xff\xfe not text")  # hidden files are not data
    check_data(texts)
    assert read_text(texts) == "alpha\n\nbeta"


def test_text_that_is_not_utf8_is_refused_before_any_work(tmp_path):
    file = tmp_path / "latin1.raw"
    file.write_bytes("caf\u00e9 au lait".encode("latin-1"))
    with pytest.raises(GQAConvertError, match=r"not UTF-8 text \(byte 3\): convert it to UTF-8"):
        check_data(file)
    late = tmp_path / "late.raw"  # a bad byte past the checked head is caught while reading
    late.write_bytes(b"a" * 200_000 + b"\xff")
    check_data(late)
    with pytest.raises(GQAConvertError, match=r"late\.raw is not UTF-8 text: convert it"):
        read_text(late)
