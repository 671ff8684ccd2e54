"""One config object per command: flags, ``--config FILE`` and the saved config, from a dataclass.

A command's options are the fields of one dataclass, written once: the type, the default and the
help text (``name: Annotated[type, "help"] = default``). From it this module makes

- the argparse flags (``--field-name``; a bool becomes ``--flag/--no-flag``; a ``Literal`` gives
  the choices; ``X | None`` accepts X), with each default shown in ``--help``;
- ``--config FILE``: a YAML mapping of field names to values. Precedence: flags given on the
  command line, then the file, then the dataclass's defaults;
- the resolved config as YAML (:func:`dump_config`), which ``--config`` reads back: a run saved
  that way replays with ``aligndistil CMD --config SAVED`` (plus e.g. a new ``--out``).

A field whose ``Annotated`` extras include :data:`SECRET` (an API key) is never written out.
A range marker among the extras (``">0"``, ``">=1"``, ``"[0,1]"``, ``"(0,1]"``) bounds a number;
every number must also be finite. Values out of range are refused before any work, naming the
flag (or the config file and key) and the limit.
Every mistake (an unknown key, a wrong type, a missing required value) is a
:class:`~storage.errors.ConfigError` naming the flag and the file.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union

from storage.errors import ConfigError

#: Marks a field that must never be saved (``Annotated[str | None, "help", SECRET]``).
SECRET = "secret"

_BOUND = re.compile(r"^(>=|>|<=|<)(-?[0-9.e+-]+)$")
_INTERVAL = re.compile(r"^([\[(])(-?[0-9.e+-]+),(-?[0-9.e+-]+)([\])])$")


def is_range_marker(text: str) -> bool:
    return bool(_BOUND.match(text) or _INTERVAL.match(text))


def check_range(marker: str, value: float) -> bool:
    """Whether ``value`` satisfies a range marker (``">0"``, ``"[0,1]"``, ...)."""
    m = _BOUND.match(marker)
    if m:
        op, limit = m.group(1), float(m.group(2))
        return {">": value > limit, ">=": value >= limit, "<": value < limit,
                "<=": value <= limit}[op]
    m = _INTERVAL.match(marker)
    lo, hi = float(m.group(2)), float(m.group(3))
    return ((value >= lo) if m.group(1) == "[" else (value > lo)) and \
        ((value <= hi) if m.group(4) == "]" else (value < hi))


def _describe_range(marker: str) -> str:
    m = _INTERVAL.match(marker)
    if m:
        return f"in {marker}"
    return {">": "> ", ">=": ">= ", "<": "< ", "<=": "<= "}[_BOUND.match(marker).group(1)] + \
        _BOUND.match(marker).group(2)


@dataclasses.dataclass(frozen=True)
class Option:
    """What the parser needs to know about one field."""
    name: str
    kind: type            #: str, int, float or bool; tuple for fixed-length float tuples
    optional: bool        #: ``X | None``
    required: bool        #: no default
    default: Any
    help: str
    choices: tuple | None
    secret: bool
    length: int | None    #: for tuples
    argparse: dict        #: extra argparse keywords (e.g. nargs="?" with a const)
    bounds: tuple[str, ...] = ()  #: range markers (">0", "[0,1]", ...)

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


def options(cls: type) -> list[Option]:
    """The options of a config dataclass, in field order."""
    hints = typing.get_type_hints(cls, include_extras=True)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        hint = hints[f.name]
        extras: tuple = ()
        if typing.get_origin(hint) is typing.Annotated:
            hint, *rest = typing.get_args(hint)
            extras = tuple(rest)
        help_text = next((e for e in extras if isinstance(e, str) and e != SECRET
                          and not is_range_marker(e)), "")
        bounds = tuple(e for e in extras if isinstance(e, str) and is_range_marker(e))
        optional = False
        if typing.get_origin(hint) in (Union, types.UnionType):
            args = [a for a in typing.get_args(hint) if a is not type(None)]
            optional = len(args) < len(typing.get_args(hint))
            if len(args) != 1:
                raise TypeError(f"{cls.__name__}.{f.name}: unsupported type {hint}")
            hint = args[0]
        choices, length = None, None
        if typing.get_origin(hint) is Literal:
            choices = typing.get_args(hint)
            kind = type(choices[0])
        elif typing.get_origin(hint) is tuple:
            length, kind = len(typing.get_args(hint)), tuple
        elif hint in (str, int, float, bool):
            kind = hint
        else:
            raise TypeError(f"{cls.__name__}.{f.name}: unsupported type {hint}")
        has_default = f.default is not dataclasses.MISSING
        out.append(Option(name=f.name, kind=kind, optional=optional, required=not has_default,
                          default=f.default if has_default else None, help=help_text,
                          choices=choices, secret=SECRET in extras, length=length,
                          argparse=next((e for e in extras if isinstance(e, dict)), {}),
                          bounds=bounds))
    return out


# ---------------------------------------------------------------------------- argparse
def add_config_arguments(parser: argparse.ArgumentParser, cls: type) -> None:
    """Add ``--config`` and one flag per field. Flags left out on the command line stay out of
    the namespace (``SUPPRESS``), so :func:`resolve` can tell them from defaults."""
    parser.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                        help="YAML file of options (keys are the flag names with underscores); "
                             "flags on the command line override it")
    for opt in options(cls):
        kwargs: dict[str, Any] = {"dest": opt.name, "default": argparse.SUPPRESS,
                                  "help": _help(opt)}
        if opt.kind is bool and not opt.optional:
            kwargs["action"] = argparse.BooleanOptionalAction
        elif opt.kind is tuple:
            kwargs.update(nargs=opt.length, type=float, metavar="X")
        else:
            kwargs["type"] = _parse_float if opt.kind is float else opt.kind
            if opt.choices:
                kwargs["choices"] = opt.choices
        kwargs.update(opt.argparse)
        parser.add_argument(opt.flag, **kwargs)


def _parse_float(text: str) -> float:
    return float(text)


def _help(opt: Option) -> str:
    text = opt.help
    if opt.bounds:
        text = f"{text} [{', '.join(_describe_range(b) for b in opt.bounds)}]"
    if "default:" in text:  # the help already says what the default does
        return text.replace("%", "%%")
    if "(none: " in text and opt.default is None:  # "(none: the server's)" says what none does
        return text.replace("(none: ", "(default: none = ").replace("%", "%%")
    if opt.required:
        return f"{text} (required)" if text else "(required)"
    if opt.kind is bool and not opt.optional:
        shown = "on" if opt.default else "off"
    elif opt.default is None:
        shown = "none"
    elif isinstance(opt.default, tuple):
        shown = " ".join(map(str, opt.default))
    else:
        shown = str(opt.default)
    return f"{text} (default: {shown})".strip().replace("%", "%%")


def resolve(cls: type, args: argparse.Namespace):
    """The config: the dataclass's defaults, overridden by ``--config FILE``, overridden by the
    flags given on the command line."""
    values: dict[str, Any] = {}
    source = getattr(args, "config", None)
    if source is not None:
        values.update(load_config_file(cls, source))
    given = vars(args)
    for opt in options(cls):
        if opt.name in given:
            values[opt.name] = _coerce(opt, given[opt.name], opt.flag)
    missing = [o for o in options(cls) if o.required and o.name not in values]
    if missing:
        names = ", ".join(o.flag for o in missing)
        raise ConfigError(f"{names} is required (on the command line, or as "
                          f"'{missing[0].name}:' in a --config file)")
    return cls(**values)


def load_config_file(cls: type, path: str | Path) -> dict[str, Any]:
    """The field values of a YAML config file, checked against ``cls``."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file"
                          + (" (it is a directory)" if path.is_dir() else ""))
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"--config {path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"--config {path}{where}: not valid YAML "
                          f"({getattr(exc, 'problem', None) or exc})") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a mapping of option names to values, "
                          f"got {type(data).__name__}")
    known = {o.name: o for o in options(cls)}
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"--config {path}: unknown option {key!r}; known options: "
                              f"{', '.join(sorted(known))}")
        values[name] = _coerce(known[name], value, f"--config {path}: {key}")
    return values


def _coerce(opt: Option, value: Any, where: str) -> Any:
    """A file's (or the parser's) value as the field's type, or a ConfigError naming it."""
    if value is None:
        if opt.optional or (opt.default is None and not opt.required):
            return None
        raise ConfigError(f"{where}: must not be empty")
    if opt.kind is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != opt.length:
            raise ConfigError(f"{where}: expected {opt.length} numbers, got {value!r}")
        numbers = tuple(_number(v, float, where) for v in value)
        if not all(math.isfinite(v) and check_range(m, v) for v in numbers for m in
                   (opt.bounds or (">-1e308",))):
            raise ConfigError(f"{where}: must be finite numbers"
                              + (f" {', '.join(map(_describe_range, opt.bounds))}"
                                 if opt.bounds else "") + f", got {value!r}")
        return numbers
    if opt.kind is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if opt.kind in (int, float):
        value = _number(value, opt.kind, where)
        if not math.isfinite(value):
            raise ConfigError(f"{where}: must be a finite number, got {value}")
        for marker in opt.bounds:
            if not check_range(marker, value):
                raise ConfigError(f"{where}: must be {_describe_range(marker)}, got {value}")
    elif not isinstance(value, str):
        raise ConfigError(f"{where}: expected text, got {value!r}")
    if opt.choices and value not in opt.choices:
        raise ConfigError(f"{where}: expected one of {', '.join(map(str, opt.choices))}, "
                          f"got {value!r}")
    return value


def _number(value: Any, kind: type, where: str):
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {'an integer' if kind is int else 'a number'}, "
                          f"got {value!r}") from None
    if kind is int and isinstance(value, float) and not value.is_integer():
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    return number


# ---------------------------------------------------------------------------- saving
def config_values(config) -> dict[str, Any]:
    """The config as plain YAML-able values, secrets left out."""
    out = {}
    for opt in options(type(config)):
        if opt.secret:
            continue
        value = getattr(config, opt.name)
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, float) and not math.isfinite(value):
            value = str(value)
        out[opt.name] = value
    return out


def dump_config(config, command: str) -> str:
    """The resolved config as YAML, headed by how to replay it."""
    import yaml

    header = (f"# aligndistil {command}: the resolved options of this run.\n"
              f"# Replay: aligndistil {command} --config THIS_FILE (flags override it).\n")
    return header + yaml.safe_dump(config_values(config), sort_keys=False)
