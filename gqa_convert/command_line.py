"""What every command of the CLI shares: flags generated from an options dataclass (the option is
declared once, in the library), errors as one line on stderr with exit code 2 (the library's errors
and click's usage errors alike), and Ctrl-C / SIGTERM unwinding so that staged output is removed."""

from __future__ import annotations

import contextlib
import dataclasses
import enum
import functools
import inspect
import logging
import os
import signal
import sys
import typing
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import click
import typer
import typer.core

from gqa_convert.errors import GQAConvertError, one_line
from gqa_convert.options import Options, cli_fields, flag_name, spec_of, split_optional

# click's usage errors: typer 0.29 and later carry a click of their own, earlier ones use click's
USAGE_ERRORS = tuple({click.ClickException, *(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")})


class OneLineErrors(typer.core.TyperGroup):
    """Usage errors (an unknown flag, a value that is not a number) as one line, like the library's."""

    def main(self, *args: Any, standalone_mode: bool = True, **kwargs: Any) -> Any:
        try:
            result = super().main(*args, standalone_mode=False, **kwargs)
        except USAGE_ERRORS as error:
            click.echo(f"error: {one_line(error.format_message())}", err=True)
            sys.exit(error.exit_code)
        if not standalone_mode:
            return result
        sys.exit(result if isinstance(result, int) else 0)


def _flags_show_no_type() -> None:
    """typer 0.29 prints a value type (<bool>) after every flag in --help, though a flag takes no
    value; show none, as click does."""
    option_class = getattr(typer.core, "TyperOption", None)
    shown = getattr(option_class, "display_type_rich", None)
    if shown is None or getattr(shown, "flags_show_no_type", False):
        return

    def display_type_rich(self: Any, ctx: Any) -> str | None:
        return None if getattr(self, "is_flag", False) else shown(self, ctx)

    display_type_rich.flags_show_no_type = True  # type: ignore[attr-defined]
    option_class.display_type_rich = display_type_rich


_flags_show_no_type()


def _cli_type(field: dataclasses.Field, annotation: Any) -> Any:
    """The type typer parses a field's flag as: text where the library parses units (5GB, 2B), an
    enumeration where the values are chosen from a list (typer shows them in --help)."""
    kind, _ = split_optional(annotation)
    repeated = typing.get_origin(kind) is tuple
    element = typing.get_args(kind)[0] if repeated else kind
    spec = spec_of(field)
    if spec.choices is not None:
        element = enum.Enum(field.name, {name: name for name in spec.names}, type=str)
    elif spec.parse is not None or element not in (int, float, str, bool):
        element = str
    return Optional[list[element]] if repeated else Optional[element]


def _parameter(field: dataclasses.Field, annotation: Any) -> inspect.Parameter:
    spec = spec_of(field)
    cli_type = _cli_type(field, annotation)
    default = field.default
    repeated = typing.get_origin(typing.get_args(cli_type)[0]) is list
    extra: dict[str, Any] = {"help": spec.help}
    if spec.metavar:
        extra["metavar"] = spec.metavar
    if spec.argument:
        info = typer.Argument(... if default is MISSING_DEFAULT else default, **extra)
    else:
        flags = spec.flags or (flag_name(field.name),)
        if typing.get_args(cli_type)[0] is bool and not spec.flags:
            flags = (f"{flags[0]}/--no-{flags[0][2:]}",) if default is True else flags
        if default is MISSING_DEFAULT:
            shown = ...
        elif repeated:
            shown = None  # the library's default applies when the flag is not given
            extra["show_default"] = ", ".join(map(str, default)) or False
        else:
            shown = default
        info = typer.Option(shown, *flags, **extra)
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=info, annotation=cli_type)


MISSING_DEFAULT = dataclasses.MISSING


def takes(options_class: type[Options], *, name: str = "options") -> Callable[[Callable], Callable]:
    """Decorate a command `def cmd(ARGS..., options: OptionsClass)`: its flags are the class's fields,
    and it is called with the options object built from them (and checked by the library)."""
    hints = typing.get_type_hints(options_class)
    fields = cli_fields(options_class)

    def decorate(command: Callable) -> Callable:
        own = [p for p in inspect.signature(command).parameters.values() if p.name != name]
        generated = [_parameter(field, hints[field.name]) for field in fields]

        @functools.wraps(command)
        def wrapper(**given: Any) -> Any:
            values = {field.name: given.pop(field.name) for field in fields}
            for field in fields:  # a repeatable flag not given: the library's default
                if values[field.name] is None and isinstance(field.default, tuple):
                    del values[field.name]
            values = {key: _plain(value) for key, value in values.items()}
            return command(**given, **{name: options_class(**values)})

        wrapper.__signature__ = inspect.Signature([*own, *generated])  # type: ignore[attr-defined]
        wrapper.__annotations__ = {p.name: p.annotation for p in [*own, *generated]}
        return wrapper

    return decorate


def changed_flags(options: Options, names: tuple[str, ...]) -> list[str]:
    """The flags among `names` whose value is not the default (to warn that a mode ignores them)."""
    fields = {field.name: field for field in dataclasses.fields(options)}
    return [flag_name(name) for name in names if getattr(options, name) != fields[name].default]


def _plain(value: Any) -> Any:
    """A parsed flag as the library takes it: enumeration members as their names, paths as text."""
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, enum.Enum):
        return value.value
    return str(value) if isinstance(value, Path) else value


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program stands so that it unwinds like Ctrl-C (staged output removed)."""


def _terminate(signum: int, frame: Any) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise Terminated


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    try:
        previous = signal.signal(signal.SIGTERM, _terminate)
    except ValueError:  # not the main thread: signals cannot be caught here
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def user_errors(interrupted: str | None = None) -> Callable[[Callable], Callable]:
    """Bad input: one line on stderr and exit 2, no traceback. Ctrl-C and SIGTERM: one line (with
    `interrupted`: what the interruption leaves), exit 130 and 143, after staged output was removed."""

    def decorate(command: Callable) -> Callable:
        @functools.wraps(command)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            warnings.formatwarning = lambda message, category, *rest: f"warning: {one_line(message)}\n"
            note = f"; {interrupted}" if interrupted else ""
            try:
                with _sigterm_unwinds():
                    quiet_libraries()
                    return command(*args, **kwargs)
            except GQAConvertError as error:
                typer.echo(f"error: {one_line(error)}", err=True)
                raise typer.Exit(2) from None
            except Terminated:
                typer.echo(f"terminated{note}", err=True)
                raise typer.Exit(128 + signal.SIGTERM) from None
            except KeyboardInterrupt:
                typer.echo(f"interrupted{note}", err=True)
                raise typer.Exit(130) from None

        return wrapper

    return decorate


def quiet_libraries() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    logging.getLogger("transformers").setLevel(logging.ERROR)
    # datasets logs a file it cannot parse as an error of its own; our one line says so instead
    os.environ.setdefault("DATASETS_VERBOSITY", "critical")  # read when datasets is first imported
    logging.getLogger("datasets").setLevel(logging.CRITICAL)
