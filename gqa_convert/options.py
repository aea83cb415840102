"""Options said once. Each option of a command is a field of a frozen dataclass that derives from
`Options`; its type is the field's annotation and its default, range, choices and help are the
field's metadata (`option(...)`). The same declaration checks every value when an options object is
built (so Python callers get the CLI's errors: a bool is not an int, nan and inf are not numbers, a
string is not a list of strings) and gives the CLI its flags (gqa_convert.cli_options)."""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable
from dataclasses import MISSING, dataclass
from typing import Any

from gqa_convert.errors import GQAConvertError

Choices = tuple[str, ...] | Callable[[], Iterable[str]]


@dataclass(frozen=True)
class Spec:
    """What the CLI and the checks need to know about one option besides its type and default."""

    help: str
    flags: tuple[str, ...] = ()  # CLI names; default --field-name (and --no-field-name for a True bool)
    choices: Choices | None = None  # allowed values (a registry's names: a callable, read when checked)
    min: float | None = None  # inclusive bounds of a number (of each element of a tuple)
    max: float | None = None
    above: float | None = None  # exclusive lower bound: "must be positive" is above=0
    parse: Callable[[str], Any] | None = None  # text -> value, for options users type with units (5GB, 2B)
    empty: bool | None = None  # whether "" (or ()) is valid; default: an empty string is not, an empty tuple is
    cli: bool = True  # False: a library setting with no flag
    argument: bool = False  # a positional argument of the command
    metavar: str | None = None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.choices() if callable(self.choices) else self.choices or ())


def option(default: Any = MISSING, *, help: str, **spec: Any) -> Any:
    """A dataclass field that is an option: `kv_heads: int = option(help="...", min=1)`."""
    return dataclasses.field(default=default, metadata={"option": Spec(help=help, **spec)})


def spec_of(field: dataclasses.Field) -> Spec:
    return field.metadata.get("option") or Spec(help="", cli=False)


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _label(field: dataclasses.Field) -> str:
    spec = spec_of(field)
    if spec.argument:
        return field.name.upper()
    long_flags = [flag for flag in spec.flags if flag.startswith("--")]
    return long_flags[0].split("/")[0] if long_flags else flag_name(field.name)


@dataclass(frozen=True, kw_only=True)
class Options:
    """Base of every options dataclass: each field is checked against its annotation and metadata
    when the object is built, then `check()` applies the rules that tie fields together."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            checked = check_value(value, hints[field.name], spec_of(field), self.label_of(field))
            if checked is not value:
                object.__setattr__(self, field.name, checked)
        self.check()

    def check(self) -> None:
        """Rules between fields (override)."""

    @classmethod
    def label_of(cls, field: dataclasses.Field) -> str:
        """How messages name a field: its flag (override: options read from a file name their keys)."""
        return _label(field)

    def replace(self, **changes: Any) -> Any:
        """A copy with some fields changed, checked like a new object."""
        return dataclasses.replace(self, **changes)


@dataclass(frozen=True, kw_only=True)
class FileOptions(Options):
    """Options read from a file (a recipe): messages name the file's keys, not flags."""

    @classmethod
    def label_of(cls, field: dataclasses.Field) -> str:
        return field.name


def _refuse(label: str, value: Any, wanted: str) -> GQAConvertError:
    shown = repr(value) if not isinstance(value, str) else f"'{value}'"
    return GQAConvertError(f"{label} must be {wanted}, not {shown} ({type(value).__name__})")


def split_optional(annotation: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [member for member in typing.get_args(annotation) if member is not type(None)]
        allows_none = len(members) < len(typing.get_args(annotation))
        return (members[0] if len(members) == 1 else typing.Union[tuple(members)]), allows_none
    return annotation, annotation is None or annotation is type(None)


def check_value(value: Any, annotation: Any, spec: Spec, label: str) -> Any:
    """The value as stored (parsed, lists made tuples), or GQAConvertError naming the option."""
    kind, allows_none = split_optional(annotation)
    if value is None:
        if allows_none:
            return None
        raise _refuse(label, value, f"given ({_describe(kind)})")
    if typing.get_origin(kind) is tuple:
        return _check_tuple(value, kind, spec, label)
    return _check_scalar(value, kind, spec, label)


def _describe(kind: Any) -> str:
    if typing.get_origin(kind) is tuple:
        element = typing.get_args(kind)[0]
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(element, "values")
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(
        kind, getattr(kind, "__name__", str(kind))
    )


def _check_tuple(value: Any, kind: Any, spec: Spec, label: str) -> tuple:
    if isinstance(value, str | bytes) or not isinstance(value, Iterable) or isinstance(value, dict):
        raise _refuse(label, value, _describe(kind) + " (a tuple or list)")
    element = typing.get_args(kind)[0]
    items = tuple(_check_scalar(item, element, spec, label) for item in value)
    if not items and spec.empty is False:
        raise GQAConvertError(f"{label} must not be empty")
    return items


def _check_scalar(value: Any, kind: Any, spec: Spec, label: str) -> Any:
    if spec.parse is not None and isinstance(value, str) and kind is not str:
        value = spec.parse(value)
    if kind is bool:
        if not isinstance(value, bool):
            raise _refuse(label, value, "true or false")
        return value
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _refuse(label, value, "an integer")
        _check_range(value, spec, label)
        return value
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _refuse(label, value, "a number")
        if not math.isfinite(value):
            raise _refuse(label, value, "a finite number")
        _check_range(value, spec, label)
        return float(value)
    if kind is str:
        if not isinstance(value, str):
            raise _refuse(label, value, "a string")
        if not value and not spec.empty:
            raise GQAConvertError(f"{label} must not be empty")
        if spec.choices is not None and value not in spec.names:
            raise GQAConvertError(f"{label} '{value}' is not known: choose one of {', '.join(spec.names)}")
        return value
    if isinstance(kind, type) and not isinstance(value, kind):
        raise _refuse(label, value, _describe(kind))
    return value


def _number(value: float) -> str:
    """A bound or value as a user types it: whole numbers in full (1048576, not 1.04858e+06)."""
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e15 else f"{value:g}"


def _check_range(value: float, spec: Spec, label: str) -> None:
    if spec.above is not None and not value > spec.above:
        raise GQAConvertError(f"{label} must be greater than {_number(spec.above)}, not {_number(value)}")
    if spec.min is not None and value < spec.min:
        raise GQAConvertError(f"{label} must be at least {_number(spec.min)}, not {_number(value)}")
    if spec.max is not None and value > spec.max:
        raise GQAConvertError(f"{label} must be at most {_number(spec.max)}, not {_number(value)}")


def cli_fields(options: type[Options]) -> list[dataclasses.Field]:
    """The fields of an options class that the CLI shows, in declaration order."""
    return [field for field in dataclasses.fields(options) if spec_of(field).cli]
