"""Recipes: `gqa-convert recipes` lists the registry, prints a recipe as a YAML file that reads back as
the same recipe, a recipe file runs like the built-in it copies (same tensors, recorded in the
provenance), and every recipe the docs name exists."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from safetensors.torch import load_file

from gqa_convert.surgery.convert import pool
from gqa_convert.surgery.recipe_files import load_recipe
from gqa_convert.surgery.recipes import DEFAULT_RECIPE, RECIPES

from helpers import build_calibratable, calibrated, runner

ROOT = Path(__file__).resolve().parents[1]


def cli(*args: str):
    result = runner.invoke(__import__("gqa_convert.cli").cli.app, list(args))
    assert result.exit_code == 0, result.output
    return result.stdout


def test_recipes_lists_every_recipe_on_one_line_and_marks_the_default():
    lines = cli("recipes").splitlines()
    assert [line.split()[0] for line in lines] == list(RECIPES)
    assert [line for line in lines if line.endswith("(default)")] == [lines[list(RECIPES).index(DEFAULT_RECIPE)]]
    listed = json.loads(cli("recipes", "--json"))
    assert listed["default"] == DEFAULT_RECIPE
    assert listed["recipes"] == [recipe.as_dict() for recipe in RECIPES.values()]


@pytest.mark.parametrize("name", RECIPES)
def test_a_printed_recipe_reads_back_as_the_same_recipe(name, tmp_path):
    text = cli("recipes", name)
    file = tmp_path / "copy.yaml"
    file.write_text(text)
    assert load_recipe(str(file)) == RECIPES[name].replace(name="copy")  # a file's name is its own
    shown = json.loads(cli("recipes", name, "--json"))
    assert shown == RECIPES[name].as_dict(every_section=False)
    assert ("aligned:" in text) == (RECIPES[name].method == "aligned")  # only the sections it reads


def test_a_recipe_file_runs_like_the_built_in_it_copies(tmp_path):
    build_calibratable(tmp_path / "src", "llama")
    file = tmp_path / "mine.yaml"
    file.write_text(cli("recipes", "closed-form"))
    pool(tmp_path / "src", tmp_path / "builtin", calibrated(1, "closed-form"))
    pool(tmp_path / "src", tmp_path / "file", calibrated(1, str(file)))
    built, copied = (load_file(tmp_path / name / "model.safetensors") for name in ("builtin", "file"))
    assert built.keys() == copied.keys() and all(built[k].equal(copied[k]) for k in built)
    record = json.loads((tmp_path / "file" / "gqa_convert.json").read_text())
    assert record["recipe_file"] == str(file) and record["calibration"]["tokens_used"] == 1024
    calibration = {**RECIPES["closed-form"].as_dict()["calibration"], "tokens": 1024, "seq_len": 64}
    assert record["recipe"] == {**RECIPES["closed-form"].as_dict(), "name": "mine", "calibration": calibration}


def test_every_recipe_the_docs_name_exists():
    named = set()
    for doc in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]:
        text = doc.read_text()
        named |= set(re.findall(r"--recipe ([a-z][a-z0-9-]*)(?![\w./-])", text))  # not a file (my.yaml)
        named |= set(re.findall(r"`recipe ([a-z][a-z0-9-]*)`", text))
    assert named, "the docs name no recipe"
    assert named <= set(RECIPES), named - set(RECIPES)
