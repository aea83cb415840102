"""A recipe by name or from a user's YAML file, and a recipe written out as YAML.

A recipe file holds the keys of gqa_convert.surgery.recipes.Recipe; its sections (calibration,
aligned, refine) are mappings of their own keys. Read with yaml.safe_load only; unknown keys, wrong
types, nan and out-of-range values are refused with one line that names the file and the key.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import yaml

from gqa_convert.errors import GQAConvertError, one_line
from gqa_convert.surgery.recipes import RECIPES, SECTIONS, Recipe

MAX_RECIPE_BYTES = 64 << 10  # a recipe is a few lines


# YAML 1.1 (PyYAML) reads 1e-3 as text; a number field takes it as the number YAML 1.2 reads
_EXPONENT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


def load_recipe(given: str) -> Recipe:
    """A built-in recipe's name, or a recipe YAML file."""
    if given in RECIPES:
        return RECIPES[given]
    path = Path(given)
    if not path.exists():
        if path.suffix.lower() in (".yaml", ".yml") or "/" in given or "\\" in given:
            raise GQAConvertError(f"recipe file {given} not found")
        raise GQAConvertError(
            f"unknown recipe '{given}': choose one of {', '.join(RECIPES)} (gqa-convert recipes lists them) "
            "or give a recipe YAML file"
        )
    if path.is_dir():
        raise GQAConvertError(f"recipe {given} is a folder: give a recipe YAML file")
    try:
        if path.stat().st_size > MAX_RECIPE_BYTES:
            raise GQAConvertError(
                f"recipe {given} is {path.stat().st_size:,} bytes: a recipe is a few lines of YAML "
                f"(at most {MAX_RECIPE_BYTES:,} bytes)"
            )
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        raise GQAConvertError(f"recipe {given} is not UTF-8 text: give a recipe YAML file") from None
    except OSError as error:
        raise GQAConvertError(f"cannot read recipe {given}: {error.strerror or error}") from None
    try:
        data = yaml.safe_load(text)
    except RecursionError:
        raise GQAConvertError(f"recipe {given} nests too deeply: a recipe is a mapping of a few sections") from None
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(error, "problem", None) or str(error)
        raise GQAConvertError(f"recipe {given} is not valid YAML{where}: {one_line(problem)}") from None
    if data is None:
        raise GQAConvertError(
            f"recipe {given} is empty: write its keys (gqa-convert recipes aligned prints a recipe to start from)"
        )
    return recipe_from_mapping(data, origin=f"recipe {given}", default_name=path.stem)


def recipe_from_mapping(data: Any, *, origin: str, default_name: str) -> Recipe:
    """A Recipe from parsed YAML, every key checked; errors name `origin` and the key."""
    top = _mapping(data, origin, {field.name for field in dataclasses.fields(Recipe)})
    values: dict[str, Any] = {"name": default_name, **top}
    for section, options_class in SECTIONS.items():
        if section in top:
            known = {field.name for field in dataclasses.fields(options_class)}
            given = _mapping(top[section] if top[section] is not None else {}, f"{origin}, {section}", known)
            values[section] = _built(options_class, given, f"{origin}, {section}")
    recipe = _built(Recipe, values, origin)
    if recipe.name in RECIPES and _settings(recipe) != _settings(RECIPES[recipe.name]):
        raise GQAConvertError(
            f"{origin} calls itself '{recipe.name}', a built-in recipe it differs from: give it a name of its own "
            "(name: ...) or leave the name out (the file's name is used)"
        )
    return recipe


def _settings(recipe: Recipe) -> dict[str, Any]:
    return {key: value for key, value in recipe.as_dict().items() if key != "summary"}


def _mapping(data: Any, origin: str, known: set[str]) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise GQAConvertError(
            f"{origin} must be a mapping of keys to values, not {type(data).__name__}: {_shown(data)}"
        )
    unknown = [key for key in data if key not in known]
    if unknown:
        raise GQAConvertError(f"{origin}: unknown key {_shown(unknown[0])}; the keys are {', '.join(sorted(known))}")
    return data


def _numbers(options_class: type, values: dict[str, Any]) -> dict[str, Any]:
    """Text such as 1e-3 in a number field (or a list of numbers) read as the number it spells."""
    hints = typing.get_type_hints(options_class)

    def number(value: Any) -> Any:
        return float(value) if isinstance(value, str) and _EXPONENT.match(value) else value

    converted = dict(values)
    for key, value in values.items():
        if key in hints and "float" in str(hints[key]):
            converted[key] = [number(v) for v in value] if isinstance(value, list) else number(value)
    return converted


def _built(options_class: type, values: dict[str, Any], origin: str) -> Any:
    try:
        return options_class(**_numbers(options_class, values))
    except GQAConvertError as error:
        raise GQAConvertError(f"{origin}: {error}") from None


def _shown(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def recipe_yaml(recipe: Recipe) -> str:
    """The recipe as a YAML file a user can copy and edit: the sections its method and grouping read,
    without its name (a file's recipe is named after the file unless it says otherwise)."""
    values = {key: value for key, value in recipe.as_dict(every_section=False).items() if key != "name"}
    return f"# from recipe {recipe.name}\n" + yaml.safe_dump(values, sort_keys=False, allow_unicode=True)
