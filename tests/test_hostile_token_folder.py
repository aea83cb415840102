"""Token folders and what they are checked against, tried as a hostile user would: every manifest field
tampered with (types, dtypes, shard names that lead out, sizes, totals, links), token ids past the
model's vocabulary (recorded in the manifest, scanned in older folders, checked on every read), a
tokenizer larger than its model's config.vocab_size, a token folder given where text is read, and a
GGUF cut short. Each is one line (GQAConvertError, exit 2 on the command line), checked before any
forward pass, and the folder read is left as it was."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from gqa_convert.data.manifest import check_token_ids, is_token_folder, read_manifest
from gqa_convert.data.text import check_data, read_text
from gqa_convert.data.tokenize import TokenizeOptions, tokenize
from gqa_convert.data.tokens import TokenBlocks, TokenStream
from gqa_convert.errors import GQAConvertError

from helpers import snapshot
from tiny_models import build_tiny, build_trainable, save_tiny_tokenizer

SAMPLE = Path(__file__).parent / "data" / "sample.txt"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A trainable tiny Llama whose tokenizer (320 ids) fits its config.vocab_size (320)."""
    folder = tmp_path_factory.mktemp("model")
    build_trainable(folder)
    return folder


@pytest.fixture(scope="module")
def token_folder(model_dir, tmp_path_factory) -> Path:
    """The sample tokenized with the model's tokenizer into three shards."""
    out = tmp_path_factory.mktemp("tokens") / "tokens"
    (out.parent / "sample.txt").write_text(SAMPLE.read_text() * 20)
    options = TokenizeOptions(tokenizer=str(model_dir), unit_bytes=16 << 10, progress=False, num_proc=1)
    tokenize(str(out.parent / "sample.txt"), out, options)
    return out


def _copy(folder: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(folder, tmp_path / "copy", symlinks=True))


def _manifest(folder: Path) -> dict:
    return json.loads((folder / "manifest.json").read_text())


def _edit(change):
    """A tampering that rewrites manifest.json after change(manifest) edits it in place."""

    def tamper(folder: Path) -> None:
        manifest = _manifest(folder)
        change(manifest)
        (folder / "manifest.json").write_text(json.dumps(manifest))

    return tamper


def _set(name: str, value):
    return _edit(lambda manifest: manifest.__setitem__(name, value))


def _shard(name: str, value):
    return _edit(lambda manifest: manifest["shards"][0].__setitem__(name, value))


def _drop(name: str):
    return _edit(lambda manifest: manifest.pop(name))


def _link_shard_out(folder: Path) -> None:
    shard = folder / _manifest(folder)["shards"][0]["file"]
    outside = folder.parent / "outside.tokens"
    outside.write_bytes(shard.read_bytes())
    shard.unlink()
    shard.symlink_to(outside)


def _link_manifest_out(folder: Path) -> None:
    outside = folder.parent / "outside.json"
    outside.write_bytes((folder / "manifest.json").read_bytes())
    (folder / "manifest.json").unlink()
    (folder / "manifest.json").symlink_to(outside)


def _grow_shard(folder: Path) -> None:
    with open(folder / _manifest(folder)["shards"][0]["file"], "ab") as handle:
        handle.write(b"\0\0")


def _duplicate_shard(manifest: dict) -> None:
    manifest["shards"].append(dict(manifest["shards"][0]))
    manifest["tokens"] += manifest["shards"][0]["tokens"]
    manifest["documents"] += manifest["shards"][0]["documents"]


DAMAGE = {
    "dtype-float16": (_set("dtype", "float16"), "dtype 'float16' is not one of uint16, uint32"),
    "dtype-int8": (_set("dtype", "int8"), "dtype 'int8'"),
    "dtype-uint64": (_set("dtype", "uint64"), "dtype 'uint64'"),
    "dtype-a-number": (_set("dtype", 16), "'dtype' is 16, not a string"),
    "format-version-2": (_set("format_version", 2), "token format 2"),
    "format-version-true": (_set("format_version", True), "'format_version' is True, not a count"),
    "tokens-a-string": (_set("tokens", "12"), "'tokens' is '12', not a count"),
    "tokens-negative": (_set("tokens", -1), "'tokens' is -1"),
    "tokens-true": (_set("tokens", True), "'tokens' is True"),
    "tokens-a-float": (_set("tokens", 12.0), "'tokens' is 12.0"),
    "tokens-nan": (
        lambda f: (f / "manifest.json").write_text(
            json.dumps(_manifest(f)).replace('"tokens": ', '"tokens": NaN, "x": ', 1)
        ),
        "'tokens' is nan",
    ),
    "shards-not-a-list": (_set("shards", {"file": "x"}), "'shards' is"),
    "shard-not-an-object": (
        _edit(lambda m: m["shards"].__setitem__(0, "shard-000000.tokens")),
        "shard 1 is not an object",
    ),
    "shard-file-parent": (_shard("file", "../outside.tokens"), "'../outside.tokens' is not a plain file name"),
    "shard-file-absolute": (_shard("file", "/etc/passwd"), "'/etc/passwd' is not a plain file name"),
    "shard-file-nested": (_shard("file", "sub/x.tokens"), "not a plain file name"),
    "shard-file-empty": (_shard("file", ""), "'' is not a plain file name"),
    "shard-file-dot": (_shard("file", "."), "'.' is not a plain file name"),
    "shard-file-a-number": (_shard("file", 7), "shard 1 'file' is 7, not a string"),
    "shard-tokens-negative": (_shard("tokens", -5), "shard 1 'tokens' is -5"),
    "shard-link-leading-out": (_link_shard_out, "is a link leading out of the folder"),
    "shard-missing": (lambda f: (f / _manifest(f)["shards"][0]["file"]).unlink(), "is missing"),
    "shard-larger-than-listed": (_grow_shard, "bytes, not"),
    "shard-listed-twice": (_edit(_duplicate_shard), "is listed twice"),
    "totals-disagree": (_edit(lambda m: m.__setitem__("tokens", m["tokens"] + 1)), "the shards hold"),
    "eos-not-the-tokenizers": (_edit(lambda m: m.__setitem__("eos_token_id", m["eos_token_id"] + 1)), "eos_token_id"),
    "max-id-past-the-dtype": (_set("max_token_id", 70_000), "max_token_id 70000 does not fit uint16"),
    "tokenizer-entry-missing-fingerprint": (_edit(lambda m: m["tokenizer"].pop("fingerprint")), "lacks 'fingerprint'"),
    "truncated": (
        lambda f: (f / "manifest.json").write_bytes((f / "manifest.json").read_bytes()[:200]),
        "not valid JSON",
    ),
    "not-utf8": (lambda f: (f / "manifest.json").write_bytes(b"\xff\xfe{"), "not valid JSON"),
    "deeply-nested": (lambda f: (f / "manifest.json").write_text("[" * 100_000), "not valid JSON"),
    "manifest-missing": (lambda f: (f / "manifest.json").unlink(), "manifest.json is missing"),
    "manifest-a-folder": (
        lambda f: ((f / "manifest.json").unlink(), (f / "manifest.json").mkdir()),
        "not a regular file",
    ),
    "manifest-link-leading-out": (_link_manifest_out, "is a link leading out of the folder"),
}
DAMAGE |= {
    f"missing-{field}": (_drop(field), f"lacks '{field}'")
    for field in ("tokens", "documents", "dtype", "shards", "source", "tokenizer", "eos_token_id", "tool_version")
}


@pytest.mark.parametrize("case", DAMAGE, ids=list(DAMAGE))
def test_a_damaged_token_folder_is_refused_in_one_line(case, token_folder, tmp_path):
    tamper, words = DAMAGE[case]
    folder = _copy(token_folder, tmp_path)
    tamper(folder)
    before = snapshot(tmp_path)
    assert is_token_folder(folder), "what is left of a token folder is read as one, and found damaged"
    for reader in (read_manifest, TokenStream, lambda f: TokenBlocks(f, seq_len=8, seed=0)):
        with pytest.raises(GQAConvertError) as caught:
            reader(folder)
        message = str(caught.value)
        assert "\n" not in message and words in message, message
        assert ("damaged" in message and "tokenize again" in message) or "token format 2" in message, message
    assert snapshot(tmp_path) == before


def test_the_largest_id_is_recorded_and_checked_against_the_vocabulary(token_folder, tmp_path):
    manifest = read_manifest(token_folder)
    stream = TokenStream(token_folder)
    largest = int(stream.read(0, len(stream)).max())
    assert manifest["max_token_id"] == largest and len(manifest["shards"]) >= 3
    check_token_ids(token_folder, manifest, largest + 1, "model")  # fits
    with pytest.raises(GQAConvertError, match=f"holds token id {largest}, but model has {largest} ids"):
        check_token_ids(token_folder, manifest, largest, "model")


def test_a_folder_without_the_recorded_id_is_scanned_and_every_read_checked(token_folder, tmp_path):
    """A folder written before the manifest recorded the largest id (or whose shard was altered after)
    is scanned; a read through TokenStream with the vocabulary size refuses an id past it."""
    folder = _copy(token_folder, tmp_path)
    manifest = _manifest(folder)
    del manifest["max_token_id"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    last = folder / manifest["shards"][-1]["file"]
    ids = np.fromfile(last, dtype=np.uint16)
    ids[5] = 999  # same size: only the values tell
    ids.tofile(last)
    with pytest.raises(GQAConvertError, match="holds token id 999, but model has 320 ids"):
        check_token_ids(folder, read_manifest(folder), 320, "model")
    stream = TokenStream(folder, vocab_size=320)
    position = len(stream) - len(ids) + 5
    stream.read(0, position)  # before it: fine
    with pytest.raises(GQAConvertError, match=r"damaged .*token id 999"):
        stream.read(position - 2, 4)


def test_uptrain_refuses_a_token_folder_with_ids_past_the_vocabulary(model_dir, token_folder, tmp_path):
    from typer.testing import CliRunner

    from gqa_convert.cli import app

    folder = _copy(token_folder, tmp_path)
    manifest = _manifest(folder)
    manifest["max_token_id"] = 400
    (folder / "manifest.json").write_text(json.dumps(manifest))
    command = ["uptrain", str(model_dir), "-o", str(tmp_path / "run"), "--data", str(folder)]
    result = CliRunner().invoke(app, [*command, "--tokens", "256", "--seq-len", "32"])
    assert result.exit_code == 2 and "holds token id 400, but" in result.stderr and "320 ids" in result.stderr
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def oversized_tokenizer_model(tmp_path_factory) -> Path:
    """A model folder whose tokenizer (320 ids) is larger than its config.vocab_size (128)."""
    folder = tmp_path_factory.mktemp("oversized")
    build_tiny(folder, "llama")
    save_tiny_tokenizer(folder)
    return folder


def test_a_tokenizer_larger_than_the_model_is_refused_before_any_forward(
    oversized_tokenizer_model, model_dir, tmp_path
):
    from typer.testing import CliRunner

    from gqa_convert.cli import app
    from gqa_convert.evaluation import EvalOptions, evaluate
    from gqa_convert.io.sources import load_tokenizer, open_checkpoint

    model = oversized_tokenizer_model
    words = "gives ids up to 319, but its config.vocab_size is 128"
    (tmp_path / "text.txt").write_text(SAMPLE.read_text())
    attempts = {
        "load_tokenizer": lambda: load_tokenizer(model, check_vocab=True),
        "checkpoint": lambda: open_checkpoint(model).tokenizer(check_vocab=True),
        "evaluate": lambda: evaluate(model, tmp_path / "text.txt", EvalOptions(seq_len=16)),
    }
    for attempt in attempts.values():
        with pytest.raises(GQAConvertError, match=words):
            attempt()
    command = ["uptrain", str(model), "-o", str(tmp_path / "run"), "--data", str(tmp_path / "text.txt")]
    result = CliRunner().invoke(app, [*command, "--tokens", "256", "--seq-len", "16"])
    assert result.exit_code == 2 and words in result.stderr, result.stderr
    assert sorted(path.name for path in tmp_path.iterdir()) == ["text.txt"]
    assert len(load_tokenizer(model_dir, check_vocab=True)) == 320  # a tokenizer that fits is accepted
    assert len(open_checkpoint(model).tokenizer()) == 320  # copying a tokenizer beside weights does not check


def test_a_token_folder_given_where_text_is_read_is_named(token_folder):
    for reader in (check_data, read_text):
        with pytest.raises(GQAConvertError, match=r"is a token folder .* uptrain --data reads token folders"):
            reader(token_folder)


def _tiny_gguf(path: Path) -> None:
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_embedding_length(8)
    writer.add_head_count(2)
    writer.add_tensor("token_embd.weight", np.arange(256, dtype=np.float32).reshape(32, 8))
    writer.add_tensor("blk.0.attn_q.weight", np.ones((8, 8), dtype=np.float16))
    writer.add_tensor("output_norm.weight", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("kept", [0.1, 0.5, -1])
def test_a_gguf_cut_short_is_refused_not_described(kept, tmp_path):
    from typer.testing import CliRunner

    from gqa_convert.cli import app
    from gqa_convert.io.gguf_header import gguf_metadata

    whole = tmp_path / "whole.gguf"
    _tiny_gguf(whole)
    assert gguf_metadata(whole)["parameters"] == 256 + 64 + 8  # the whole file: every tensor counted
    data = whole.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: int(len(data) * kept)] if kept > 0 else data[:kept])
    with pytest.raises(GQAConvertError, match=r"cut\.gguf (is truncated|has a truncated or corrupt GGUF header)"):
        gguf_metadata(cut)
    result = CliRunner().invoke(app, ["inspect", str(cut)])
    assert result.exit_code == 2 and "truncated" in result.stderr and result.stderr.count("\n") == 1
