"""The one output guard every writing command goes through: nothing of the user's is replaced or
deleted, whatever the flags (--force, --resume, machine ranks), and no input inside OUT is ever lost.
Each case is run through the CLI and checked against a snapshot of the user's files."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from gqa_convert.data.tokenize import TokenizeOptions, tokenize
from gqa_convert.errors import GQAConvertError
from gqa_convert.io.names import OWNED_NAMES
from gqa_convert.io.output import foreign_entries, guard_output
from gqa_convert.train.launch import uptrain
from gqa_convert.train.settings import TrainSettings

from helpers import SAMPLE, fails, runner, snapshot
from tiny_models import build_trainable

TRAIN = ["--tokens", 256, "--seq-len", 32, "--micro-batch-size", 2]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("guard") / "model"
    build_trainable(folder, "llama")
    return folder


@pytest.fixture(scope="module")
def pooled(model, tmp_path_factory) -> Path:
    """A model folder this tool wrote (a pool output)."""
    out = tmp_path_factory.mktemp("guard") / "pooled"
    result = runner.invoke(app_cli(), ["pool", str(model), "-o", str(out), "-g", "1", "--recipe", "mean"])
    assert result.exit_code == 0, result.output
    return out


def app_cli():
    from gqa_convert.cli import app

    return app


def test_resume_into_a_copied_model_is_refused_and_nothing_changes(model, pooled, tmp_path):
    """`cp -r some-model users-model; uptrain ... -o users-model --resume`: no run to resume there."""
    for copied in (pooled, model):  # one this tool wrote (no checkpoints), one it did not
        users = tmp_path / f"users-{copied.name}"
        shutil.copytree(copied, users)
        before = snapshot(users)
        fails(["uptrain", model, "-o", users, "--data", SAMPLE, *TRAIN, "--resume"], "nothing to resume")
        assert snapshot(users) == before


def test_resume_of_an_empty_or_missing_folder_is_refused(model, tmp_path):
    (tmp_path / "empty").mkdir()
    fails(["uptrain", model, "-o", tmp_path / "empty", "--data", SAMPLE, *TRAIN, "--resume"], "is empty")
    fails(["uptrain", model, "-o", tmp_path / "missing", "--data", SAMPLE, *TRAIN, "--resume"], "nothing to resume")
    assert not (tmp_path / "missing").exists()


def test_force_never_deletes_an_input_inside_out(model, tmp_path):
    """`uptrain tiny -o U --data U/corpus.txt --force` and its kin: the input is refused, not deleted."""
    run = tmp_path / "run"
    uptrain(TrainSettings(model=str(model), out=str(run), data=str(SAMPLE), tokens=256, seq_len=32))
    assert not foreign_entries(run)
    corpus = run / "data" / "corpus.txt"  # under a name the tool itself writes
    corpus.write_text(SAMPLE.read_text())
    before = snapshot(run)
    for flags in (["--force"], ["--resume"], []):
        fails(["uptrain", model, "-o", run, "--data", corpus, *TRAIN, *flags], "lies inside the output folder")
        fails(["uptrain", model, "-o", run, "--data", SAMPLE, "--eval-data", corpus, *TRAIN, *flags], "inside")
    assert snapshot(run) == before


def test_tokenize_never_deletes_its_corpus(model, tmp_path):
    """`tokenize oldtok/mycorpus.txt -o oldtok --force`."""
    old = tmp_path / "oldtok"
    tokenize(str(SAMPLE), old, TokenizeOptions(tokenizer=str(model), progress=False))
    corpus = old / "shard-mycorpus.txt"  # even under a name the tool writes
    shutil.copy(SAMPLE, corpus)
    before = snapshot(old)
    fails(["tokenize", corpus, "-o", old, "--tokenizer", model, "--force"], "lies inside the output folder")
    assert snapshot(old) == before


def test_force_refuses_a_tool_folder_holding_a_users_file(model, pooled, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(pooled, out)
    (out / "notes.txt").write_text("my notes")
    before = snapshot(out)
    for args in (
        ["pool", model, "-o", out, "-g", 1, "--force"],
        ["expand", model, "-o", out, "--force"],
        ["uptrain", model, "-o", out, "--data", SAMPLE, *TRAIN, "--force"],
        ["tokenize", SAMPLE, "-o", out, "--tokenizer", model, "--force"],
    ):
        fails(args, "did not write (notes.txt)")
    assert snapshot(out) == before


def test_other_machines_never_replace_out(model, tmp_path):
    """A machine of rank > 0 joins the run rank 0 began: --force does not clear OUT there."""
    out = tmp_path / "foreign"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    guard_output(out, inputs=[model], force=True, mode="join")  # nothing to refuse, nothing done
    assert (out / "mine.txt").read_text() == "keep"
    with pytest.raises(GQAConvertError, match="did not write"):
        guard_output(out, inputs=[model], force=True, mode="train")


def test_every_command_writes_only_names_the_guard_knows(model, tmp_path):
    """OWNED_NAMES is the guard's table of what this tool writes: every output matches it, so
    --force can replace each of them (and nothing else)."""
    outputs = {}
    for name, args in {
        "pool": ["pool", model, "-g", 1, "--calib-tokens", 512, "--calib-seq-len", 64],  # the default recipe
        "expand": ["expand", model],
        "tokenize": ["tokenize", SAMPLE, "--tokenizer", model],
    }.items():
        outputs[name] = tmp_path / name
        result = runner.invoke(app_cli(), [*map(str, args), "-o", str(outputs[name])])
        assert result.exit_code == 0, result.output
    outputs["uptrain"] = tmp_path / "uptrain"
    uptrain(
        TrainSettings(
            model=str(model),
            out=str(outputs["uptrain"]),
            data=str(SAMPLE),
            tokens=256,
            seq_len=32,
            eval_data=str(SAMPLE),
        )
    )
    for name, out in outputs.items():
        assert foreign_entries(out) == [], (name, foreign_entries(out), OWNED_NAMES)
