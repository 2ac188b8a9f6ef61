"""Command-line flags and TOML files for a frozen dataclass config, one flag per field.

Every field becomes ``--field-name`` with the field's type, and its help text says the default.
Parsing returns only the values the user gave, so a caller can tell "left at the default" from
"set to the default's value": config files, resumed runs and context-dependent defaults need that.
A config file holds the same names (``batch_size = 8``, or ``batch-size = 8``); flags override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any, Sequence

from .errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def field_types(cls: type) -> dict[str, type]:
    """The scalar type of each field of a dataclass (``int | None`` -> int)."""
    hints = typing.get_type_hints(cls)
    out = {}
    for f in dataclasses.fields(cls):
        t = hints[f.name]
        if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
            t = next(a for a in typing.get_args(t) if a is not type(None))
        out[f.name] = t
    return out


def _finite(kind: type):
    def parse(text: str):
        value = kind(text)
        if kind is float and not math.isfinite(value):
            raise ValueError(text)
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error: "invalid float value"
    return parse


def add_fields(parser: argparse.ArgumentParser, cls: type, help: dict[str, str]) -> None:
    """One flag per field of ``cls``; booleans get --x/--no-x. Each default is left unset (see module doc)."""
    defaults = cls()
    for name, kind in field_types(cls).items():
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        text = help[name] + ("" if default is None or "(default" in help[name] else f" (default: {default!r})"
                             if isinstance(default, str) else f" (default: {default})")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=text)
        else:
            parser.add_argument(flag, type=_finite(kind), default=argparse.SUPPRESS, help=text,
                                metavar=name.upper())


def read_toml(path: str | Path, cls: type) -> dict[str, Any]:
    """The fields a TOML file sets, checked against ``cls``'s names and types."""
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise UserError(f"config file {path} not found") from None
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path} is not valid TOML: {e}") from None
    except RecursionError:
        raise UserError(f"{path} is not valid TOML: nested too deeply") from None
    kinds = field_types(cls)
    out = {}
    for key, value in data.items():
        name = key.replace("-", "_")
        if name not in kinds:
            raise UserError(f"{path}: unknown setting {key!r}")
        kind = kinds[name]
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise UserError(f"{path}: {key} must be {kind.__name__}, got {value!r}")
        if isinstance(value, float) and not math.isfinite(value):  # as the flags refuse them
            raise UserError(f"{path}: {key} must be a finite number, got {value}")
        if isinstance(value, str) and "\0" in value:  # no path, name or spec holds one (argv cannot)
            raise UserError(f"{path}: {key} holds a NUL character")
        if name in out:
            raise UserError(f"{path}: {key} is set twice (as {key!r} and as another spelling)")
        out[name] = value
    return out


def to_toml(cfg: Any) -> str:
    """A config as TOML, every field set (unset ones, None, are written as comments)."""
    lines = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if value is None:
            lines.append(f"# {f.name} = (unset)")
        elif isinstance(value, bool):
            lines.append(f"{f.name} = {'true' if value else 'false'}")
        elif isinstance(value, str):
            escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            lines.append(f'{f.name} = "{escaped}"')
        else:
            lines.append(f"{f.name} = {value!r}")
    return "\n".join(lines) + "\n"


def _check_help_covers(cls: type, help: dict[str, str]) -> None:
    missing = [f.name for f in dataclasses.fields(cls) if f.name not in help]
    if missing:
        raise AssertionError(f"fields without help text: {missing}")


def build(cls: type, help: dict[str, str], prog: str, description: str,
          epilog: str | None = None) -> argparse.ArgumentParser:
    """A parser with ``--config FILE`` and one flag per field of ``cls``."""
    _check_help_covers(cls, help)
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
    p.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                   help="a TOML file of settings (the names of these flags); flags given here override it")
    add_fields(p, cls, help)
    return p


def parse(parser: argparse.ArgumentParser, cls: type, argv: Sequence[str] | None) -> dict[str, Any]:
    """The settings the user gave: the config file's, overridden by the flags'."""
    values = dict(vars(parser.parse_args(argv)))  # the parser leaves out flags not given
    path = values.pop("config", None)
    return {**(read_toml(path, cls) if path else {}), **values}
