"""pool, expand and recipes tried as a hostile user would, one test per class of problem: recipe files
that are not recipes, recipe names that are not files, contradictions and impossible sizes, inputs
inside the output folder, calibration text that is not text, and settings that would be ignored.
Every refusal is one line (exit 2) before any work: OUT is not created, no work folder is left, and
every input is exactly as it was."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

from gqa_convert.errors import GQAConvertError
from gqa_convert.surgery.options import PoolOptions

from helpers import SAMPLE, build_calibratable, refused, runner, snapshot

CALIBRATE = ["--calib-data", SAMPLE, "--calib-tokens", 512, "--calib-seq-len", 64]


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("hostile-pool") / "model"
    build_calibratable(folder, "llama")  # 256 positions
    return folder


def pool_args(model: Path, out: Path, *extra: object) -> list:
    return ["pool", model, "-o", out, "-g", 1, *extra]


@pytest.mark.parametrize(
    "content, expected",
    [
        (b"", "is empty: write its keys"),
        (b"# only a comment\n", "is empty"),
        (b"- method: aligned\n", "must be a mapping of keys to values, not list"),
        (b"aligned\n", "must be a mapping of keys to values, not str"),
        (b"method: aligned\n  key_merge: complex\n", "is not valid YAML (line 2)"),
        (b'x: !!python/object/apply:os.system ["touch pwned"]\n', "could not determine a constructor"),
        (b"method: aligned\n\xff\xfe\n", "is not UTF-8 text"),
        (b"[" * 20000 + b"]" * 20000, "nests too deeply"),
        (b"method: aligned\nkey_merge: complex\n", "unknown key 'key_merge'; the keys are aligned, calibration"),
        (b"method: aligned\naligned:\n  band: 1\n", "aligned: unknown key 'band'"),
        (b"method: aligned\naligned: complex\n", "aligned must be a mapping of keys to values, not str"),
        (b"method: aligned\n3: 4\n", "unknown key 3"),
        (b"method: 3\n", "method must be a string, not 3 (int)"),
        (b"method: median\n", "method 'median' is not known: choose one of mean, first, random, aligned"),
        (b"method: aligned\ncalibration:\n  tokens: many\n", "calibration: tokens must be an integer, not 'many'"),
        (b"method: aligned\ncalibration:\n  tokens: 2.5\n", "tokens must be an integer, not 2.5"),
        (b"method: aligned\ncalibration:\n  tokens: true\n", "tokens must be an integer, not True"),
        (b"method: aligned\ncalibration:\n  sequential: 1\n", "sequential must be true or false, not 1"),
        (b"method: aligned\naligned:\n  band_angle: .nan\n", "band_angle must be a finite number, not nan"),
        (b"method: aligned\naligned:\n  band_angle: -.inf\n", "band_angle must be a finite number, not -inf"),
        (b"method: aligned\naligned:\n  band_angle: 0\n", "band_angle must be greater than 0"),
        (b"method: aligned\naligned:\n  output_ridges: []\n", "output_ridges must not be empty"),
        (b"method: aligned\naligned:\n  output_ridges: 1\n", "output_ridges must be a list of numbers"),
        (b"method: aligned\naligned:\n  output_ridges: [1e300]\n", "output_ridges must be at most 1000000, not 1e+300"),
        (b"method: aligned\nrefine:\n  steps: 100000000000\n", "steps must be at most 10000"),
        (b"method: aligned\nrefine:\n  steps: -1\n", "steps must be at least 0"),
        (b"method: aligned\nrefine:\n  lr: 0\n", "lr must be greater than 0"),
        (b"method: aligned\ncalibration:\n  tokens: 100000000000\n", "tokens must be at most 1048576"),
        (b"method: aligned\ncalibration:\n  text: web\n", "text 'web' is not known: choose one of user, self"),
        (b"name: null\nmethod: aligned\n", "name must be given"),
        (b"name: ''\nmethod: aligned\n", "name must not be empty"),
        (b"method: aligned\n" + b"# padding\n" * 10000, "a recipe is a few lines of YAML"),
    ],
)
def test_a_recipe_file_that_is_not_a_recipe_is_one_line(model, tmp_path, content, expected):
    recipe = tmp_path / "my-recipe.yaml"
    recipe.write_bytes(content)
    out = tmp_path / "out"
    message = refused(pool_args(model, out, "--recipe", recipe, *CALIBRATE), expected, out=out, source=model)
    assert f"recipe {recipe}" in message  # names the file
    with pytest.raises(GQAConvertError) as raised:  # the Python API says the same
        PoolOptions(kv_heads=1, recipe=str(recipe), calib_data=(str(SAMPLE),))
    assert f"error: {raised.value}" == message
    assert not (tmp_path / "pwned").exists() and not Path("pwned").exists()


@pytest.mark.parametrize(
    "given, expected",
    [
        ("folder", "is a folder: give a recipe YAML file"),
        ("missing.yaml", "recipe file {tmp}/missing.yaml not found"),
        ("no-such-recipe", "unknown recipe 'no-such-recipe': choose one of mean, first"),
        ("", "--recipe must not be empty"),
    ],
)
def test_a_recipe_that_names_nothing_readable_is_one_line(model, tmp_path, given, expected):
    (tmp_path / "folder").mkdir()
    argument = str(tmp_path / given) if given in ("folder", "missing.yaml") else given
    out = tmp_path / "out"
    refused(pool_args(model, out, "--recipe", argument), expected.format(tmp=tmp_path), out=out)
    result = runner.invoke(__import__("gqa_convert.cli").cli.app, ["recipes", argument or "''"])
    assert result.exit_code == 2 and len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--recipe", "aligned"], "recipe aligned calibrates on text of the model's domain: pass --calib-data FILE"),
        (["--recipe", "aligned-similarity", "--calib-tokens", 512], "--calib-data FILE"),
        (["--method", "mean", "--recipe", "aligned", *CALIBRATE], "--method mean contradicts --recipe aligned"),
        (["--method", "aligned", "--recipe", "closed-form", "--method", "first"], "--method first contradicts"),
        (["--method", "aligned", "--calib-data", SAMPLE], "--calib-seq-len 512 is above the model's 256 positions"),
        (["--method", "aligned", "--calib-data", SAMPLE, "--calib-seq-len", 1000], "above the model's 256 positions"),
        (["--method", "aligned", *CALIBRATE, "--calib-tokens", 32], "less than one window of --calib-seq-len 64"),
        (["--method", "aligned", *CALIBRATE, "--calib-data", SAMPLE, "--calib-tokens", 100], "(2 texts share them)"),
        (["--method", "aligned", *CALIBRATE, "--calib-tokens", 10**9], "--calib-tokens must be at most 1048576"),
        (["--method", "aligned", *CALIBRATE, "--calib-seq-len", 1], "--calib-seq-len must be at least 2"),
        (["--method", "aligned", *CALIBRATE, "--device", "tpu"], "unknown device 'tpu'"),
        (["--method", "aligned", *CALIBRATE, "--calib-text-column", ""], "--calib-text-column must not be empty"),
        (["--method", "median"], "'median' is not one of"),
        (["--kv-heads", 0], "--kv-heads must be at least 1"),
        (["--kv-heads", 3], "choose one of 1, 2"),
        (["--kv-heads", 10**12], "choose one of 1, 2"),
        (["--key-merge", "complex"], "No such option: --key-merge"),
    ],
)
def test_contradictions_and_impossible_sizes_are_refused_before_any_work(model, tmp_path, extra, expected):
    out = tmp_path / "out"
    refused(pool_args(model, out, *extra), expected, out=out, source=model)


@pytest.mark.parametrize(
    "where", ["calibration text", "recipe file", "out inside the text's folder", "out is the text"]
)
def test_inputs_inside_out_are_refused_and_never_deleted(model, tmp_path, where):
    out = tmp_path / "out"
    runner.invoke(
        __import__("gqa_convert.cli").cli.app, list(map(str, pool_args(model, out, "--recipe", "mean")))
    )  # OUT: ours
    text, recipe = tmp_path / "calib.txt", tmp_path / "recipe.yaml"
    shutil.copy(SAMPLE, text)
    recipe.write_text("method: aligned\n")
    # inside OUT under a name the tool writes there (so only the input check stands between it and --force)
    if where == "calibration text":
        text = out / "README.md"
        shutil.copy(SAMPLE, text)
    elif where == "recipe file":
        recipe = out / "README.md"
        recipe.write_text("method: aligned\n")
    elif where == "out inside the text's folder":
        (tmp_path / "texts").mkdir()
        shutil.copy(SAMPLE, tmp_path / "texts" / "calib.txt")
        text, out = tmp_path / "texts", tmp_path / "texts" / "out"
    else:
        out = text
    before = snapshot(tmp_path)
    calibration = ["--calib-data", text, "--calib-tokens", 512, "--calib-seq-len", 64]
    expected = "is the input" if where == "out is the text" else "inside"
    refused(pool_args(model, out, "--recipe", recipe, *calibration, "--force"), expected)
    assert snapshot(tmp_path) == before, "an input or the output changed"


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda path: path.write_text(""), "holds no text"),
        (lambda path: path.write_text("Too little text.\n"), "calibration needs at least 256"),
        (lambda path: path.write_bytes(b"\x00\x01\xff" * 4000), "calib.txt"),
        (lambda path: path.mkdir(), "calib.txt"),
        (lambda path: path.with_suffix(".jsonl").write_text('{"body": "no text column"}\n'), "text"),
        (lambda path: None, "not found"),
    ],
    ids=["empty", "short", "binary", "empty-folder", "table-without-column", "missing"],
)
def test_calibration_text_that_is_not_enough_text_is_one_line(model, tmp_path, make, expected):
    text = tmp_path / "calib.txt"
    make(text)
    if not text.exists() and text.with_suffix(".jsonl").exists():
        text = text.with_suffix(".jsonl")
    out = tmp_path / "out"
    args = pool_args(model, out, "--method", "aligned", "--calib-data", text, "--calib-tokens", 256)
    refused([*args, "--calib-seq-len", 64], expected, out=out, source=model)


@pytest.mark.parametrize(
    "extra, warned",
    [
        (["--recipe", "mean", "--calib-data", SAMPLE], "--calib-data ignored: recipe mean uses no calibration"),
        (
            ["--recipe", "mean", "--calib-tokens", 512, "--calib-seq-len", 64],
            "--calib-tokens, --calib-seq-len ignored: recipe mean",
        ),
        (["--recipe", "{unused}"], "its aligned settings are not used by method mean with grouping contiguous"),
        (["--recipe", "{steps0}", *CALIBRATE], "refine.lr and refine.target are ignored with refine.steps 0"),
        (
            ["--recipe", "{similar}", *CALIBRATE],
            "its refine settings are not used by method mean with grouping similarity",
        ),
    ],
)
def test_settings_that_would_be_ignored_are_warned_about(model, tmp_path, extra, warned):
    (tmp_path / "unused.yaml").write_text("method: mean\naligned:\n  key_merge: complex\n")
    (tmp_path / "steps0.yaml").write_text("method: aligned\nrefine:\n  lr: 0.1\n")
    (tmp_path / "similar.yaml").write_text("method: mean\ngrouping: similarity\nrefine:\n  steps: 3\n")
    files = {"{unused}": "unused.yaml", "{steps0}": "steps0.yaml", "{similar}": "similar.yaml"}
    extra = [str(tmp_path / files[a]) if a in files else a for a in extra]
    args = list(map(str, pool_args(model, tmp_path / "out", *extra)))
    with pytest.warns(UserWarning, match=re.escape(warned)):
        result = runner.invoke(__import__("gqa_convert.cli").cli.app, args)
    assert result.exit_code == 0, result.output


def test_a_recipe_file_may_not_pass_for_a_built_in_it_differs_from(model, tmp_path):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("name: aligned\nmethod: aligned\naligned:\n  key_merge: complex\n")
    out = tmp_path / "out"
    refused(pool_args(model, out, "--recipe", recipe, *CALIBRATE), "calls itself 'aligned', a built-in", out=out)
    recipe.write_text("name: aligned\nmethod: aligned\n")  # the same as the built-in: it is the built-in
    assert PoolOptions(kv_heads=1, recipe=str(recipe), calib_data=(str(SAMPLE),)).recipe.name == "aligned"


def test_the_default_recipe_on_a_short_context_model_names_the_window_to_pass(model, tmp_path):
    out = tmp_path / "out"
    refused(
        ["pool", model, "-o", out, "-g", 1],
        "--calib-seq-len 512 is above the model's 256 positions",
        "(--calib-seq-len 256 or less)",
        out=out,
        source=model,
    )


def test_an_output_holding_its_calibration_is_replaced_by_force_but_never_fed_its_own_ids(model, tmp_path):
    import json
    import os

    import torch
    from safetensors.torch import load_file

    from gqa_convert.cli import app

    out, sizes = tmp_path / "out", ["--calib-tokens", 512, "--calib-seq-len", 64]
    previous = os.umask(0o027)
    try:
        result = runner.invoke(app, list(map(str, pool_args(model, out, *sizes))))
    finally:
        os.umask(previous)
    assert result.exit_code == 0, result.output
    kept = out / "calibration" / "self_generated.safetensors"
    assert {oct(p.stat().st_mode & 0o777) for p in kept.parent.iterdir()} == {oct(0o640)}
    assert json.loads((out / "gqa_convert.json").read_text())["calibration"]["kept"] == "calibration/"
    before = snapshot(out)
    refused(pool_args(model, out, *sizes, "--calib-data", kept, "--force"), "lies inside the output folder")
    assert snapshot(out) == before
    shutil.copy(kept, tmp_path / "ids.safetensors")
    result = runner.invoke(app, list(map(str, pool_args(model, out, *sizes, "--force"))))
    assert result.exit_code == 0, result.output
    assert torch.equal(load_file(kept)["input_ids"], load_file(tmp_path / "ids.safetensors")["input_ids"])  # seeded
    again = pool_args(model, out, "--recipe", "aligned", "--calib-data", tmp_path / "ids.safetensors", *sizes)
    result = runner.invoke(app, list(map(str, [*again, "--force"])))
    assert result.exit_code == 0, result.output
    assert not (out / "calibration").exists()  # the earlier run's kept text went with it
