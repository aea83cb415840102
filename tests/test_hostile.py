"""Hostile input and hostile conditions for the conversion commands: nothing lost, nothing leaked.

Each case ends in one line on stderr with exit 2 (nothing written, the source untouched) or in the
correct result: incomplete or inconsistent checkpoints, corrupt safetensors headers (with a seeded
fuzz checked against the safetensors library itself), bad configs and pickles, --force over a user's
files, symlinks and dotfiles in the source, permissions, concurrent writers, SIGTERM and SIGKILL."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import signal
import struct
import subprocess
import time
import warnings
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from gqa_convert.cli import app
from gqa_convert.errors import GQAConvertError
from gqa_convert.io.output import THIS_HOST, guard_output
from gqa_convert.io.safetensors_format import read_safetensors_header
from gqa_convert.io.sources import open_checkpoint

from helpers import SAMPLE, cli, fails, refused, runner, snapshot
from tiny_models import TINY, build_tiny, build_trainable, load, logits


def rewrite(file: Path, drop: str | None = None, add: dict[str, torch.Tensor] | None = None) -> None:
    tensors = load_file(file)
    if drop is not None:
        del tensors[drop]
    save_file({**tensors, **(add or {})}, file, metadata={"format": "pt"})


# ---- incomplete or inconsistent checkpoints ----


def test_a_missing_weight_is_named_and_nothing_is_written(src, tmp_path):
    rewrite(src / "model.safetensors", drop="model.layers.1.self_attn.v_proj.weight")
    for command in (
        ["pool", src, "-o", tmp_path / "out", "-g", 1, "--recipe", "mean"],
        ["expand", src, "-o", tmp_path / "out"],
    ):
        refused(command, "model.layers.1.self_attn.v_proj.weight", "incomplete", out=tmp_path / "out", source=src)
    refused(["inspect", src], "lacks 1 tensor", "v_proj", source=src)


def sharded(src: Path, folder: Path) -> dict:
    """A copy of src in several shards with an index (written by pool, kv count unchanged)."""
    result = runner.invoke(
        app, ["pool", str(src), "-o", str(folder), "-g", "2", "--recipe", "mean", "--max-shard-size", "20KB"]
    )
    assert result.exit_code == 0, result.output
    return json.loads((folder / "model.safetensors.index.json").read_text())


def test_an_index_that_stops_listing_a_shard(src, tmp_path):
    folder = tmp_path / "sharded"
    index = sharded(src, folder)
    shards = sorted(set(index["weight_map"].values()))
    forgotten = shards[1]
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if v != forgotten}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    out = tmp_path / "out"
    refused(
        ["pool", folder, "-o", out, "-g", 1, "--recipe", "mean"],
        f"does not list the shard {forgotten}",
        out=out,
        source=folder,
    )
    held = sorted(load_file(folder / forgotten))
    (folder / forgotten).unlink()  # the shard gone too: the tensors it held are named
    message = refused(["pool", folder, "-o", out, "-g", 1, "--recipe", "mean"], "incomplete", out=out, source=folder)
    assert held and all(name in message for name in held), (held, message)


def test_an_index_that_puts_a_tensor_in_the_wrong_shard(src, tmp_path):
    folder = tmp_path / "sharded"
    index = sharded(src, folder)
    shards = list(index["weight_map"].values())
    name, shard = next((n, s) for n, s in index["weight_map"].items() if shards.count(s) > 1)  # the shard stays listed
    other = next(s for s in sorted(set(index["weight_map"].values())) if s != shard)
    index["weight_map"][name] = other
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    refused(["inspect", folder], f"'{name}'", "re-download", source=folder)


@pytest.mark.parametrize("model_type", sorted(TINY))
def test_every_tensor_of_every_architecture_is_required(tmp_path, model_type):
    """The untouched checkpoint opens without a word; without any one tensor it is refused naming it."""
    build_tiny(tmp_path / "src", model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        open_checkpoint(tmp_path / "src")
    names = sorted(load_file(tmp_path / "src" / "model.safetensors"))
    dropped = random.Random(model_type).choice(names)
    rewrite(tmp_path / "src" / "model.safetensors", drop=dropped)
    with pytest.raises(GQAConvertError, match="incomplete") as error:
        open_checkpoint(tmp_path / "src")
    assert f": {dropped};" in str(error.value), str(error.value)


def test_an_unknown_extra_tensor_is_carried_over_with_a_warning(src, tmp_path):
    extra = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    rewrite(src / "model.safetensors", add={"model.custom_scale": extra})
    with pytest.warns(UserWarning, match=r"1 tensor of .* carried over unchanged: model\.custom_scale"):
        result = runner.invoke(app, ["pool", str(src), "-o", str(tmp_path / "out"), "-g", "1", "--recipe", "mean"])
    assert result.exit_code == 0, result.output
    with safe_open(tmp_path / "out" / "model.safetensors", "pt") as handle:
        torch.testing.assert_close(handle.get_tensor("model.custom_scale"), extra, atol=0, rtol=0)


# ---- corrupt safetensors headers ----


def safetensors_bytes(header: object, data: bytes = b"", length: int | None = None) -> bytes:
    raw = json.dumps(header).encode() if not isinstance(header, bytes) else header
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


ONE = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}
HOSTILE_HEADERS = {
    "a JSON list": (safetensors_bytes([1, 2]), "not a JSON object"),
    "a gap": (safetensors_bytes({"a": {**ONE, "data_offsets": [4, 12]}}, bytes(12)), "leaves a gap"),
    "negative offsets": (safetensors_bytes({"a": {**ONE, "data_offsets": [-8, 0]}}, bytes(8)), "corrupt header entry"),
    "overlapping": (
        safetensors_bytes({"a": ONE, "b": {**ONE, "data_offsets": [4, 12]}}, bytes(12)),
        "overlaps the previous one",
    ),
    "a float shape": (safetensors_bytes({"a": {**ONE, "shape": [2.0]}}, bytes(8)), "shape or data offsets"),
    "a huge length": (safetensors_bytes({"a": ONE}, bytes(8), length=2**63), "corrupt header (length"),
    "trailing bytes": (safetensors_bytes({"a": ONE}, bytes(9)), "the header describes 8"),
    "truncated data": (safetensors_bytes({"a": ONE}, bytes(7)), "truncated"),
    "an unknown dtype": (safetensors_bytes({"a": {**ONE, "dtype": "F99"}}, bytes(8)), "dtype F99"),
    "text metadata": (safetensors_bytes({"__metadata__": {"n": 1}, "a": ONE}, bytes(8)), "__metadata__"),
    "a name twice": (b'{"a":' + json.dumps(ONE).encode() + b',"a":' + json.dumps(ONE).encode() + b"}", "twice"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE_HEADERS))
def test_a_corrupt_safetensors_header_is_one_line(src, tmp_path, case):
    content, expected = HOSTILE_HEADERS[case]
    if case == "a name twice":
        content = safetensors_bytes(content, bytes(8))
    (src / "model.safetensors").write_bytes(content)
    refused(["inspect", src], expected, source=src)
    refused(
        ["pool", src, "-o", tmp_path / "out", "-g", 1, "--recipe", "mean"], expected, out=tmp_path / "out", source=src
    )


def fuzzed_header(rng: random.Random) -> bytes:
    """A valid file, then (mostly) one hostile change: entries, offsets, shapes, dtypes, lengths, bytes."""
    sizes = {"F32": 4, "F16": 2, "BF16": 2, "I64": 8, "U8": 1, "BOOL": 1}
    header: object = {}
    offset = 0
    for i in range(rng.randint(0, 4)):
        dtype, shape = rng.choice(list(sizes)), [rng.randint(0, 4) for _ in range(rng.randint(0, 3))]
        size = sizes[dtype] * int(torch.tensor(shape).prod()) if shape else sizes[dtype]
        header[f"t{i}"] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    names = list(header)
    values: list = [None, True, 2**70, -1, 2.5, "x", [], [1, -1], {}, {"dtype": "F32"}, [[[[]]]]]
    change = rng.randrange(10)
    if change == 0 and names:
        entry = header[rng.choice(names)]
        entry["data_offsets"] = [entry["data_offsets"][0] + rng.choice([-3, -1, 1, 2]), entry["data_offsets"][1]]
    elif change == 1 and names:
        header[rng.choice(names)]["shape"] = rng.choice([[-1], [2.0], [True], ["2"], [2**62, 2**62], None])
    elif change == 2 and names:
        header[rng.choice(names)]["dtype"] = rng.choice(["F99", 3, None, "f32"])
    elif change == 3 and names:
        header[rng.choice(names)]["data_offsets"] = rng.choice([[0], [0, 1, 2], None, [1.5, 3], [True, 2], [-8, 0]])
    elif change == 4:
        header["__metadata__"] = rng.choice(values)
    elif change == 5 and names:
        header[rng.choice(names)] = rng.choice(values)
    elif change == 6:
        header = rng.choice(values)
    elif change == 7 and len(names) > 1:  # two entries swap places: an overlap or a gap
        a, b = rng.sample(names, 2)
        header[a]["data_offsets"], header[b]["data_offsets"] = header[b]["data_offsets"], header[a]["data_offsets"]
    raw = json.dumps(header).encode()
    if rng.random() < 0.05:
        raw = bytes(rng.randrange(256) for _ in range(rng.randint(0, 40)))
    length = rng.choice([len(raw)] * 8 + [2**63, len(raw) - 1, len(raw) + 3])
    content = struct.pack("<Q", length) + raw + bytes(rng.randrange(256) for _ in range(offset))
    cut = rng.random()
    if cut < 0.1:
        content = content[: rng.randrange(len(content) + 1)]
    elif cut < 0.15:
        content += bytes(rng.randint(1, 9))
    return content


def test_safetensors_header_fuzz_agrees_with_the_safetensors_library(tmp_path):
    """300 seeded files: our check refuses with one GQAConvertError exactly where the safetensors
    library refuses, never raises anything else, and what it accepts the library reads alike."""
    rng = random.Random(1234)
    accepted = refused_count = 0
    for case in range(300):
        path = tmp_path / f"{case}.safetensors"
        path.write_bytes(fuzzed_header(rng))
        try:
            infos = read_safetensors_header(path)
        except GQAConvertError as error:
            assert "\n" not in str(error)
            infos = None
        try:
            with safe_open(path, "pt") as handle:
                theirs = {name: handle.get_tensor(name) for name in handle.keys()}
        except Exception:  # the library's own refusal (SafetensorError and others)
            theirs = None
        assert (infos is None) == (theirs is None), (case, path.read_bytes()[:200])
        if infos is None:
            refused_count += 1
            continue
        accepted += 1
        assert {info.name: (info.shape, info.dtype) for info in infos} == {
            name: (tuple(t.shape), t.dtype) for name, t in theirs.items()
        }
    assert accepted > 50 and refused_count > 100, (accepted, refused_count)  # both sides exercised


# ---- bad configs and pickles ----


@pytest.mark.parametrize(
    "change, expected",
    [
        ({"num_attention_heads": "4"}, "num_attention_heads"),
        ({"num_key_value_heads": -2}, "num_key_value_heads is -2"),
        ({"num_key_value_heads": 3}, "do not divide"),
        ({"hidden_size": 0}, "hidden_size"),
        ({"model_type": None}, "no model_type"),
    ],
)
def test_a_bad_config_is_one_line(src, tmp_path, change, expected):
    config = json.loads((src / "config.json").read_text())
    config.update(change)
    config = {k: v for k, v in config.items() if v is not None}
    (src / "config.json").write_text(json.dumps(config))
    message = refused(
        ["pool", src, "-o", tmp_path / "out", "-g", 1, "--recipe", "mean"], expected, out=tmp_path / "out", source=src
    )
    assert "'None'" not in message and "choose one of" not in message
    refused(["inspect", src], expected, source=src)


def pickled_source(tmp_path: Path, content: object, **save: object) -> Path:
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(tmp_path / "src" / "config.json", folder)
    torch.save(content, folder / "pytorch_model.bin", **save)
    return folder


def test_a_bin_holding_a_list_is_one_line(src, tmp_path):
    folder = pickled_source(tmp_path, [torch.zeros(2), torch.ones(2)])
    refused(["inspect", folder, "--allow-pickle"], "does not hold a state dict", source=folder)


def test_a_legacy_torch_save_bin_is_read_with_allow_pickle(src, tmp_path):
    model = load(src)
    folder = pickled_source(tmp_path, dict(model.state_dict()), _use_new_zipfile_serialization=False)
    refused(
        ["pool", folder, "-o", tmp_path / "out", "-g", 1, "--recipe", "mean"], "--allow-pickle", out=tmp_path / "out"
    )
    result = runner.invoke(
        app, ["pool", str(folder), "-o", str(tmp_path / "out"), "-g", "1", "--recipe", "mean", "--allow-pickle"]
    )
    assert result.exit_code == 0, result.output
    mean = runner.invoke(app, ["pool", str(src), "-o", str(tmp_path / "reference"), "-g", "1", "--recipe", "mean"])
    assert mean.exit_code == 0, mean.output
    torch.testing.assert_close(logits(load(tmp_path / "out")), logits(load(tmp_path / "reference")))


# ---- the output folder: never a user's files, the right permissions, one writer ----


def test_force_never_replaces_the_current_directory(src, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    monkeypatch.chdir(home)
    refused(["pool", src, "-o", ".", "-g", 1, "--recipe", "mean", "--force"], "current directory", source=src)
    assert snapshot(home) == {"thesis.tex": hashlib.sha256(b"years of work").hexdigest()}
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.chdir(empty)  # even empty: renaming a folder onto the working directory pulls it away
    refused(["pool", src, "-o", ".", "-g", 1, "--recipe", "mean"], "current directory", source=src)
    (empty / "sub").mkdir()
    monkeypatch.chdir(empty / "sub")  # nor a folder that holds it
    refused(
        ["pool", src, "-o", "..", "-g", 1, "--recipe", "mean", "--force"], "current directory or holds it", source=src
    )


def test_uptrain_force_replaces_only_a_folder_this_tool_wrote(tmp_path):
    model = tmp_path / "model"
    build_trainable(model, "llama")
    run = ["--data", SAMPLE, "--seq-len", 32, "--micro-batch-size", 4, "--tokens", 256]
    users = tmp_path / "users"
    users.mkdir()
    (users / "notes.txt").write_text("mine")
    refused(["uptrain", model, "-o", users, *run, "--force"], "did not write", source=model)
    assert snapshot(users) == {"notes.txt": hashlib.sha256(b"mine").hexdigest()}
    out = tmp_path / "out"
    assert runner.invoke(app, ["uptrain", str(model), "-o", str(out), *map(str, run)]).exit_code == 0
    (out / "metrics.jsonl").write_text('{"step": 99, "tokens": 0, "loss": 1.0}\n')  # marks the old run
    result = runner.invoke(app, ["uptrain", str(model), "-o", str(out), *map(str, run), "--force"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]


def test_side_files_are_an_allow_list_of_regular_files_inside_the_source(src, tmp_path):
    secret = tmp_path / "shadow"
    secret.write_text("root:$6$secret-hash")
    (src / ".env").write_text("HF_TOKEN=hf_secret")
    (src / "special_tokens_map.json").symlink_to(secret)  # a link out of the source
    (src / "templates").mkdir()
    (src / "templates" / "chat.jinja").write_text("{{ messages }}")
    (src / "chat_template.jinja").symlink_to(src / "templates" / "chat.jinja")  # a link inside it
    os.mkfifo(src / "tokenizer.model")  # reading it would block forever
    (src / "LICENSE").write_text("Apache-2.0")
    (src / "notes.txt").write_text("my notes")
    (src / "tokenizer_config.json").write_text("{}")
    with pytest.warns(UserWarning) as warned:
        result = runner.invoke(app, ["pool", str(src), "-o", str(tmp_path / "out"), "-g", "1", "--recipe", "mean"])
    assert result.exit_code == 0, result.output
    out = tmp_path / "out"
    written = sorted(p.name for p in out.iterdir())
    assert written == sorted(
        ["LICENSE", "README.md", "chat_template.jinja", "config.json", "generation_config.json"]
        + ["gqa_convert.json", "model.safetensors", "tokenizer_config.json"]
    )
    assert (
        not (out / "chat_template.jinja").is_symlink() and (out / "chat_template.jinja").read_text() == "{{ messages }}"
    )
    for path in out.iterdir():
        assert b"secret" not in path.read_bytes(), path
    message = " ".join(str(w.message) for w in warned if "not copied" in str(w.message))
    for expected in (
        ".env (hidden)",
        "special_tokens_map.json (link leading outside",
        "tokenizer.model (not a regular",
    ):
        assert expected in message, message
    assert "notes.txt" in message and "templates (folder)" in message


@pytest.mark.parametrize("umask, folder_mode, file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_outputs_have_the_permissions_of_a_plain_mkdir(src, tmp_path, umask, folder_mode, file_mode):
    (src / "tokenizer_config.json").write_text("{}")
    (src / "tokenizer_config.json").chmod(0o600)  # copied as content: the mode follows the umask
    previous = os.umask(umask)
    try:
        result = runner.invoke(
            app, ["pool", str(src), "-o", str(tmp_path / "new" / "out"), "-g", "1", "--recipe", "mean"]
        )
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    assert (tmp_path / "new").stat().st_mode & 0o777 == folder_mode
    assert (tmp_path / "new" / "out").stat().st_mode & 0o777 == folder_mode
    for path in (tmp_path / "new" / "out").iterdir():
        assert path.stat().st_mode & 0o777 == file_mode, path


@pytest.fixture(scope="module")
def medium(tmp_path_factory) -> Path:
    """A 48 MB model: its conversion runs long enough to be stopped while it writes."""
    folder = tmp_path_factory.mktemp("medium") / "src"
    build_tiny(folder, "llama", hidden_size=256, intermediate_size=1024, vocab_size=16000, num_hidden_layers=4)
    return folder


def stopped_while_writing(args: list, out: Path) -> subprocess.Popen:
    """Start a conversion and SIGSTOP it once its staged folder exists (it holds the lock then)."""
    process = subprocess.Popen(cli(*args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    prefix = f".{out.name}.tmp-{THIS_HOST}-{process.pid}-"
    deadline = time.monotonic() + 120
    while not any(p.name.startswith(prefix) for p in out.parent.iterdir()):
        assert process.poll() is None, f"the run ended first: {process.communicate()}"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    os.kill(process.pid, signal.SIGSTOP)
    assert any(p.name.startswith(prefix) for p in out.parent.iterdir()), "the run finished before it was stopped"
    return process


def work_files(parent: Path, name: str) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


def test_a_second_writer_is_refused_naming_the_first(medium, tmp_path):
    out = tmp_path / "out"
    first = stopped_while_writing(["pool", medium, "-o", out, "-g", 1, "--recipe", "mean", "--dtype", "bfloat16"], out)
    try:
        message = fails(
            ["pool", medium, "-o", out, "-g", 2, "--recipe", "mean", "--force"],
            "being written by another",
            f"pid {first.pid}",
        )
        assert "-g 1" in message  # the first run's command line
    finally:
        os.kill(first.pid, signal.SIGCONT)
    _, stderr = first.communicate(timeout=300)
    assert first.returncode == 0, stderr
    assert json.loads((out / "config.json").read_text())["num_key_value_heads"] == 1  # the first run's output
    assert work_files(tmp_path, "out") == []


def test_sigterm_removes_the_staged_folder(medium, tmp_path):
    out = tmp_path / "out"
    process = stopped_while_writing(
        ["pool", medium, "-o", out, "-g", 1, "--recipe", "mean", "--dtype", "bfloat16"], out
    )
    os.kill(process.pid, signal.SIGTERM)
    os.kill(process.pid, signal.SIGCONT)
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 143, stderr
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("warning: ")]
    assert lines[-1] == "terminated; nothing was written to the output folder" and "Traceback" not in stderr
    assert not out.exists() and work_files(tmp_path, "out") == []


def test_the_staging_of_a_killed_run_is_removed_by_the_next_run(medium, tmp_path):
    out = tmp_path / "out"
    process = stopped_while_writing(
        ["pool", medium, "-o", out, "-g", 1, "--recipe", "mean", "--dtype", "bfloat16"], out
    )
    os.kill(process.pid, signal.SIGKILL)
    process.communicate()
    left = work_files(tmp_path, "out")
    assert any(name.startswith(f".out.tmp-{THIS_HOST}-{process.pid}-") for name in left), left  # what SIGKILL leaves
    result = subprocess.run(
        cli("pool", medium, "-o", out, "-g", 2, "--recipe", "mean"), capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert work_files(tmp_path, "out") == [] and (out / "model.safetensors").exists()


def without_root_powers() -> None:
    """In the child, before exec: root loses CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so file modes
    bind it as they bind any user (a no-op for other users, whom they bind already)."""
    if os.geteuid() == 0:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        for capability in (1, 2):  # CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH
            assert libc.prctl(24, capability, 0, 0, 0) == 0, os.strerror(ctypes.get_errno())  # PR_CAPBSET_DROP


def test_an_unwritable_output_is_one_line(tmp_path):
    build_trainable(tmp_path / "model", "llama")
    locked, run = tmp_path / "locked", tmp_path / "run"  # a folder the user cannot write; a run in a read-only OUT
    locked.mkdir()
    run.mkdir()
    (run / "metrics.jsonl").write_text("")
    (run / "checkpoints").mkdir()
    uptrain = ["--data", SAMPLE, "--tokens", 256, "--seq-len", 32]
    cases = [
        (["pool", tmp_path / "model", "-o", locked / "out", "-g", 1, "--recipe", "mean"], f"cannot write in {locked}"),
        (["uptrain", tmp_path / "model", "-o", locked / "out", *uptrain], f"cannot write in {locked}"),
        (["uptrain", tmp_path / "model", "-o", run, *uptrain, "--resume"], f"cannot write in {run}"),
    ]
    for folder in (locked, run):
        folder.chmod(0o555)
    try:
        for args, expected in cases:
            result = subprocess.run(
                cli(*args), preexec_fn=without_root_powers, capture_output=True, text=True, timeout=300
            )
            assert result.returncode == 2, result.stderr
            assert result.stderr.strip().startswith("error: ") and len(result.stderr.strip().splitlines()) == 1
            assert expected in result.stderr, result.stderr
        assert snapshot(locked) == {} and snapshot(run) == {
            "metrics.jsonl": hashlib.sha256(b"").hexdigest(),
            "checkpoints": "dir",
        }
    finally:
        for folder in (locked, run):
            folder.chmod(0o755)


def test_an_output_beside_a_gguf_file_is_not_inside_it(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))  # not a real GGUF: only its place matters here
    guard_output(tmp_path / "out", inputs=[gguf])  # beside the file: allowed
    with pytest.raises(GQAConvertError, match="is the input"):
        guard_output(gguf, inputs=[gguf])
    message = fails(
        ["pool", gguf, "-o", tmp_path / "out", "-g", 1, "--recipe", "mean"], "GGUF version 0 is not supported"
    )
    assert "inside the source" not in message


# ---- one line instead of a traceback, and messages that name a fix the command has ----


@pytest.fixture(scope="module")
def trainable(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile") / "model"
    build_trainable(folder, "llama")
    return folder


def test_a_malformed_jsonl_line_is_one_line_naming_the_file(trainable, tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text('{"text": "a first row of text"}\n{"text": not json\n')
    out = tmp_path / "out"
    refused(["eval", trainable, "--data", data, "--seq-len", 32], f"{data} could not be read")
    refused(["uptrain", trainable, "-o", out, "--data", data, "--seq-len", 32, "--tokens", 256], "rows.jsonl", out=out)
    calibration = ["--calib-data", data, "--calib-seq-len", 32]
    refused(["pool", trainable, "-o", out, "-g", 1, "--method", "aligned", *calibration], "rows.jsonl", out=out)


def test_a_negative_learning_rate_writes_nothing(trainable, tmp_path):
    out = tmp_path / "out"
    args = ["uptrain", trainable, "-o", out, "--data", SAMPLE, "--seq-len", 32, "--tokens", 256]
    refused([*args, "--lr", -1], "--lr must be greater than 0", out=out, source=trainable)
    result = runner.invoke(app, [*map(str, args), "--dry-run"])  # the next run is not told to --resume
    assert result.exit_code == 0, result.output


def test_eval_batch_size_zero_and_a_model_without_tokenizer(trainable, tmp_path):
    refused(["eval", trainable, "--data", SAMPLE, "--seq-len", 32, "--batch-size", 0], "--batch-size")
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(trainable / name, bare)
    refused(["eval", bare, "--data", SAMPLE, "--seq-len", 32], "has no tokenizer", "save the tokenizer", source=bare)


def test_eval_of_pickle_weights_names_a_fix_that_exists(src, tmp_path, trainable):
    folder = tmp_path / "pickled"
    shutil.copytree(trainable, folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")
    message = refused(["eval", folder, "--data", SAMPLE, "--seq-len", 32], "gqa-convert pool", source=folder)
    fix = message[message.index("gqa-convert pool") :].split(" (")[0].split()[1:]  # the command it suggests
    copy = tmp_path / "copy"
    fix[fix.index("FOLDER")] = str(copy)
    assert runner.invoke(app, fix).exit_code == 0  # the suggested command works...
    result = runner.invoke(app, ["eval", str(copy), "--data", str(SAMPLE), "--seq-len", "32", "--json"])
    reference = runner.invoke(app, ["eval", str(trainable), "--data", str(SAMPLE), "--seq-len", "32", "--json"])
    assert (
        result.exit_code == 0 and json.loads(result.stdout)["perplexity"] == json.loads(reference.stdout)["perplexity"]
    )


def test_uptrain_of_a_gguf_file_says_to_convert_it(trainable, tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    out = tmp_path / "out"
    refused(["uptrain", gguf, "-o", out, "--data", SAMPLE, "--tokens", 256], "GGUF file", "convert it first", out=out)


def test_random_with_the_current_kv_count_says_it_redraws_every_head(src, tmp_path):
    with pytest.warns(UserWarning, match="every kv head is redrawn"):
        result = runner.invoke(app, ["pool", str(src), "-o", str(tmp_path / "out"), "-g", "2", "--method", "random"])
    assert result.exit_code == 0, result.output
