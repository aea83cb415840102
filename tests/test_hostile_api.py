"""The options of every command, built from Python as a hostile caller would: wrong types (a bool is
not an int, a string is not a list of strings), nan and inf, out-of-range values. Each is refused
when the object is built, with one GQAConvertError naming the option; the CLI's flags are generated
from the same declarations (checked here field by field)."""

from __future__ import annotations

import dataclasses
import math

import click
import pytest
import typer.main

from gqa_convert.benchmark import BenchOptions
from gqa_convert.calibration import CalibrationSettings
from gqa_convert.cli import app
from gqa_convert.data.tokenize import TokenizeOptions
from gqa_convert.errors import GQAConvertError
from gqa_convert.evaluation import EvalOptions, TaskEvalOptions
from gqa_convert.inspection import InspectOptions
from gqa_convert.options import Options, cli_fields, flag_name, spec_of
from gqa_convert.surgery.aligned import AlignedSettings, RefineSettings
from gqa_convert.surgery.options import ExpandOptions, PoolOptions
from gqa_convert.surgery.recipes import Recipe
from gqa_convert.train.settings import TrainSettings

from helpers import fails

REQUIRED = {
    TrainSettings: dict(model="m", out="o", data="d"),
    TokenizeOptions: dict(tokenizer="t"),
    PoolOptions: dict(kv_heads=1),
    Recipe: dict(name="mine"),
}
CLASSES = [TrainSettings, TokenizeOptions, PoolOptions, ExpandOptions, EvalOptions, BenchOptions, InspectOptions]
CLASSES += [Recipe, CalibrationSettings, AlignedSettings, RefineSettings]
COMMANDS = {
    "pool": PoolOptions,
    "uptrain": TrainSettings,
    "tokenize": TokenizeOptions,
    "expand": ExpandOptions,
    "eval": (EvalOptions, TaskEvalOptions),
    "bench": BenchOptions,
    "inspect": InspectOptions,
}


def build(cls: type, **values: object) -> Options:
    return cls(**{**REQUIRED.get(cls, {}), **values})


def hostile_values(field: dataclasses.Field, kind: object) -> list[object]:
    """Values of the wrong type for a field: what a careless or hostile caller passes."""
    text = str(kind)
    if "tuple" in text:
        return ["file.txt", 3, {"a": 1}]
    if text.startswith("bool") or kind is bool:
        return [1, "yes", None]
    if "int" in text and "float" not in text:
        return [True, 2.5, "2x", math.nan]
    if "float" in text:
        return [True, math.nan, math.inf, -math.inf, "fast"]
    if "str" in text:
        return [3, b"bytes", ["a"]]
    if isinstance(kind, type) and issubclass(kind, Options):  # a section of a recipe
        return [{"a": 1}, "x", 3]
    return []


def fields_of(cls: type) -> list[tuple[dataclasses.Field, object]]:
    import typing

    hints = typing.get_type_hints(cls)
    return [(field, hints[field.name]) for field in dataclasses.fields(cls)]


@pytest.mark.parametrize("cls", CLASSES, ids=lambda cls: cls.__name__)
def test_every_field_refuses_values_of_the_wrong_type(cls):
    tried = 0
    for field, kind in fields_of(cls):
        for value in hostile_values(field, kind):
            if value is None and "None" in str(kind):
                continue
            if isinstance(value, str) and spec_of(field).parse is not None:
                continue  # parsed text: its own messages (test below)
            with pytest.raises(GQAConvertError) as raised:
                build(cls, **{field.name: value})
            message = str(raised.value)
            assert len(message.splitlines()) == 1
            named = (field.name.replace("_", "-"), field.name.upper(), field.name)
            assert any(name in message for name in named), message
            tried += 1
    assert tried >= len(dataclasses.fields(cls))


@pytest.mark.parametrize(
    "cls, values, expected",
    [
        (PoolOptions, dict(kv_heads="2"), "--kv-heads must be an integer, not '2'"),
        (PoolOptions, dict(kv_heads=True), "--kv-heads must be an integer, not True"),
        (PoolOptions, dict(calib_data="other.txt"), "--calib-data must be a list of strings"),
        (PoolOptions, dict(calib_seq_len=1), "--calib-seq-len must be at least 2"),
        (PoolOptions, dict(recipe=3), "--recipe must be a recipe name, a YAML file or a Recipe, not 3"),
        (RefineSettings, dict(lr=math.nan), "lr must be a finite number"),
        (CalibrationSettings, dict(tokens=0), "tokens must be at least 1"),
        (AlignedSettings, dict(band_angle=math.inf), "band_angle must be a finite number"),
        (Recipe, dict(calibration={"tokens": 5}), "calibration must be CalibrationSettings"),
        (TrainSettings, dict(num_processes=0), "--num-processes must be at least 1"),
        (TrainSettings, dict(lr=math.inf), "--lr must be a finite number"),
        (TrainSettings, dict(tokens="lots"), "token count 'lots' is not understood"),
        (TrainSettings, dict(tokens="0"), "--tokens must be at least 1"),
        (TrainSettings, dict(strategy="fsdp"), "choose one of auto, ddp, fsdp2, deepspeed"),
        (TrainSettings, dict(main_process_port=70000), "--main-process-port must be at most 65535"),
        (TokenizeOptions, dict(num_proc=0), "--num-proc must be at least 1"),
        (TokenizeOptions, dict(text_column=""), "--text-column must not be empty"),
        (ExpandOptions, dict(max_shard_size="0"), "less than one byte"),
        (ExpandOptions, dict(max_shard_size="-5GB"), "not understood"),
        (ExpandOptions, dict(max_shard_size="infGB"), "not understood"),
        (EvalOptions, dict(seq_len=1), "--seq-len must be at least 2"),
        (BenchOptions, dict(new_tokens=-1), "--new-tokens must be at least 1"),
        (InspectOptions, dict(cache_dtype="int4"), "choose one of auto, float32"),
    ],
)
def test_messages_name_the_option_and_the_fix(cls, values, expected):
    with pytest.raises(GQAConvertError, match=None) as raised:
        build(cls, **values)
    assert expected in str(raised.value), str(raised.value)


def test_values_are_stored_as_declared():
    settings = build(TrainSettings, tokens="2B", original_tokens="2T", eval_tokens="64K")
    assert (settings.tokens, settings.original_tokens, settings.eval_tokens) == (2 * 10**9, 2 * 10**12, 64_000)
    assert build(PoolOptions, recipe="aligned", calib_data=["a.txt", "b.txt"]).calib_data == ("a.txt", "b.txt")
    assert build(TrainSettings, lr=1).lr == 1.0 and isinstance(build(TrainSettings, lr=1).lr, float)
    with pytest.raises(GQAConvertError, match="--lr must be greater than 0"):
        build(TrainSettings).replace(lr=0.0)


def _click_command(name: str) -> click.Command:
    return typer.main.get_command(app).commands[name]


@pytest.mark.parametrize("command, cls", COMMANDS.items())
def test_each_flag_is_its_options_field(command, cls):
    """The CLI's options are generated from the dataclass: same names, same defaults, same help."""
    params = {param.name: param for param in _click_command(command).params}
    classes = cls if isinstance(cls, tuple) else (cls,)
    for field in (field for each in classes for field in cli_fields(each)):
        param = params.pop(field.name)
        spec = spec_of(field)
        assert param.help == spec.help
        if spec.argument:
            continue
        if not spec.flags:
            assert flag_name(field.name) in param.opts
        if field.default is not dataclasses.MISSING and not isinstance(field.default, tuple):
            default = param.default.value if hasattr(param.default, "value") else param.default
            assert default == field.default, field.name
    assert set(params) <= {"as_json", "source", "out", "data", "models", "model", "baseline"}, set(params)


@pytest.mark.parametrize(
    "args, expected",
    [
        (["uptrain", "m", "-o", "o", "--data", "d", "--lr", "fast"], "Invalid value for '--lr'"),
        (["uptrain", "m", "-o", "o", "--data", "d", "--num-processes", "0"], "--num-processes must be at least 1"),
        (["uptrain", "m", "-o", "o", "--data", "d", "--lr", "nan"], "--lr must be a finite number"),
        (["uptrain", "m", "-o", "o", "--data", "d", "--strategy", "fsdp"], "'fsdp' is not one of"),
        (["uptrain", "m", "-o", "o", "--data", "d", "--no-such-flag"], "No such option: --no-such-flag"),
        (["tokenize", "d", "-o", "o", "--tokenizer", "t", "--max-tokens", "-3"], "token count '-3'"),
        (["inspect"], "Missing argument"),
    ],
)
def test_usage_errors_are_one_line(args, expected):
    fails(args, expected)
