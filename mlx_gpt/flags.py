"""Command-line flags and TOML files for a config of frozen dataclasses, one flag per setting.

A config is a dataclass whose fields are settings or sections (dataclasses themselves). Each
setting is declared with ``setting(default, help)``: its help lives beside it, and its flag is
``--name`` (or the ``flag`` it names, so that a section can say ``rank`` for ``--lora-rank``).
Flag names are unique across sections, so a config is also a flat mapping of name -> value:
that is what flags, TOML files and saved runs hold (``to_flat``/``from_flat``).

Parsing returns only the values the user gave, so a caller can tell "left at the default" from
"set to the default's value": config files, resumed runs and context-dependent defaults need that.
A config file holds the same names (``batch_size = 8``, or ``batch-size = 8``), at its top level
or under a table named for the section (``[optim]``); flags override it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import types
import typing
from pathlib import Path
from typing import Any, Iterator, NamedTuple, Sequence

from .errors import UserError

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]


def setting(default: Any, help: str, *, flag: str | None = None, resumable: bool = False) -> Any:
    """A config field: its default, its help text, its flag's name when not the field's, and
    whether a resumed run may change it (how long and how often, never what is trained)."""
    meta = {"help": help, "resumable": resumable, **({"flag": flag} if flag else {})}
    return dataclasses.field(default=default, metadata=meta)


class Setting(NamedTuple):
    name: str  # the flat name: the flag without its dashes, the key of TOML files and saved runs
    path: tuple[str, ...]  # attribute names from the config down to the field
    kind: type  # a scalar type, or tuple for a list of ``item``s (``--budgets 10,60``)
    default: Any
    help: str
    resumable: bool
    item: type | None = None


def _scalar(t: Any) -> type:
    if isinstance(t, types.UnionType) or typing.get_origin(t) is typing.Union:
        return next(a for a in typing.get_args(t) if a is not type(None))
    return typing.get_origin(t) or t


def _item(t: Any) -> type | None:
    """The item type of ``tuple[T, ...]`` (None for a scalar)."""
    return typing.get_args(t)[0] if typing.get_origin(t) is tuple else None


def field_types(cls: type) -> dict[str, type]:
    """The scalar type of each field of a dataclass (``int | None`` -> int)."""
    hints = typing.get_type_hints(cls)
    return {f.name: _scalar(hints[f.name]) for f in dataclasses.fields(cls)}


def settings(cls: type, path: tuple[str, ...] = ()) -> Iterator[Setting]:
    """Every setting of a config class, sections flattened, in declaration order."""
    kinds, hints = field_types(cls), typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = kinds[f.name]
        if dataclasses.is_dataclass(kind):
            yield from settings(kind, path + (f.name,))
        else:
            if "help" not in f.metadata:
                raise AssertionError(f"{cls.__name__}.{f.name} has no help text")
            yield Setting(f.metadata.get("flag", f.name), path + (f.name,), kind, f.default,
                          f.metadata["help"], f.metadata.get("resumable", False), _item(hints[f.name]))


def table(cls: type) -> dict[str, Setting]:
    out: dict[str, Setting] = {}
    for s in settings(cls):
        assert s.name not in out, f"two settings are named {s.name}"
        out[s.name] = s
    return out


def to_flat(cfg: Any) -> dict[str, Any]:
    """name -> value of every setting of ``cfg``."""
    out = {}
    for s in settings(type(cfg)):
        value = cfg
        for part in s.path:
            value = getattr(value, part)
        out[s.name] = value
    return out


def from_flat(cls: type, values: dict[str, Any], path: tuple[str, ...] = ()) -> Any:
    """A config of ``cls`` from name -> value (unnamed settings keep their defaults)."""
    kinds, kw = field_types(cls), {}
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(kinds[f.name]):
            kw[f.name] = from_flat(kinds[f.name], values, path + (f.name,))
        elif (name := f.metadata.get("flag", f.name)) in values:
            value = values[name]
            kw[f.name] = tuple(value) if kinds[f.name] is tuple and isinstance(value, list) else value
    return cls(**kw)


def _finite(kind: type):
    def parse(text: str):
        value = kind(text)
        if kind is float and not math.isfinite(value):
            raise ValueError(text)
        return value

    parse.__name__ = kind.__name__  # argparse names the type in its error: "invalid float value"
    return parse


def _items(item: type):
    """A list flag's word: comma-separated items (``--budgets 10,60``; words may follow, ``10 60``)."""
    one = _finite(item)

    def parse(text: str) -> list:
        return [one(t) for t in text.split(",") if t.strip()]

    parse.__name__ = f"comma-separated {item.__name__}"
    return parse


class _Flatten(argparse.Action):
    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, tuple(v for word in values for v in word))


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return ",".join(f"{v:g}" if isinstance(v, float) else str(v) for v in value)
    return repr(value) if isinstance(value, str) else str(value)


def _help(s: Setting) -> str:
    if s.default is None or "(default" in s.help or s.kind is bool:
        return s.help
    return f"{s.help} (default: {_shown(s.default)})"


def add_settings(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per setting of ``cls``; booleans get --x/--no-x. Each is left unset unless given."""
    for s in settings(cls):
        flag = "--" + s.name.replace("_", "-")
        if s.kind is bool:
            shown = s.help if "(default" in s.help else f"{s.help} (default: {'on' if s.default else 'off'})"
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=shown)
        elif s.kind is tuple:
            parser.add_argument(flag, type=_items(s.item), nargs="+", action=_Flatten, default=argparse.SUPPRESS,
                                help=_help(s), metavar=s.name.upper())
        else:
            parser.add_argument(flag, type=_finite(s.kind), default=argparse.SUPPRESS, help=_help(s),
                                metavar=s.name.upper())


def read_toml(path: str | Path, cls: type) -> dict[str, Any]:
    """The settings a TOML file sets (flat, or in tables named for the sections), checked against
    ``cls``'s names and types."""
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
    known = table(cls)
    sections = {s.path[0] for s in known.values() if len(s.path) > 1}
    # a section's table ([optim]); a key of the same name holding a value is a setting (data = "x.txt")
    tables = {k: v for k, v in data.items() if k in sections and isinstance(v, dict)}
    out: dict[str, Any] = {}
    for section, entries in [("", {k: v for k, v in data.items() if k not in tables}), *tables.items()]:
        for key, value in entries.items():
            name = key.replace("-", "_")
            if name not in known or (section and known[name].path[0] != section):
                raise UserError(f"{path}: unknown setting {key!r}" + (f" in [{section}]" if section else ""))
            if name in out:
                raise UserError(f"{path}: {key} is set twice")
            out[name] = checked(path, key, value, known[name])
    return out


def checked(path: str | Path, key: str, value: Any, s: Setting) -> Any:
    """``value`` of setting ``s`` as read from a file (a TOML file, a saved run's config): of the
    setting's type (None where it may be unset), finite, without NUL; else one error naming both."""
    kind = s.kind
    if value is None and s.default is None:
        return None
    if kind is tuple and isinstance(value, list):
        value, kind = tuple(_toml_items(path, key, value, s.item)), tuple
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{path}: {key} must be {kind.__name__}, got {value!r}")
    if isinstance(value, float) and not math.isfinite(value):  # as the flags refuse them
        raise UserError(f"{path}: {key} must be a finite number, got {value}")
    if isinstance(value, str) and "\0" in value:  # no path, name or spec holds one (argv cannot)
        raise UserError(f"{path}: {key} holds a NUL character")
    return value


def _toml_items(path: str | Path, key: str, values: list, item: type) -> list:
    out = []
    for v in values:
        if item is float and isinstance(v, int) and not isinstance(v, bool):
            v = float(v)
        if not isinstance(v, item) or (item is int and isinstance(v, bool)) or (item is float and not math.isfinite(v)):
            raise UserError(f"{path}: {key} must be a list of {item.__name__}, got {v!r} in it")
        out.append(v)
    return out


def merge_resumed(cls: type, saved: dict, given: dict, why: str, keep: Sequence[str] = ("resume", "out"),
                  where: str = "the saved settings") -> dict:
    """The saved settings (name -> value, read from ``where``), with only the ``given`` ones that a
    resumed run may change (``resumable``) taken over; another given setting that differs is
    refused (``why``). ``keep``: settings always taken from ``given`` (how to resume, not what)."""
    known = table(cls)
    if not isinstance(saved, dict):
        raise UserError(f"{where}: the saved settings are not a table")
    base = to_flat(from_flat(cls, {k: checked(where, k, v, known[k]) for k, v in saved.items()
                                   if k in known and k not in keep}))
    changes = {}
    for name in sorted(set(given) - set(keep)):
        if given[name] == base[name]:
            continue
        if not known[name].resumable:
            raise UserError(f"--{name.replace('_', '-')} {_shown(given[name])} differs from {_shown(base[name])} "
                            f"saved; {why}")
        changes[name] = given[name]
    return {**base, **changes, **{k: given[k] for k in keep if k in given}}


def to_toml(cfg: Any, leave_out: Sequence[str] = ()) -> str:
    """A config as flat TOML, every setting written (unset ones, None, as comments)."""
    lines = []
    for name, value in to_flat(cfg).items():
        if name in leave_out:
            continue
        if value is None:
            lines.append(f"# {name} = (unset)")
        elif isinstance(value, bool):
            lines.append(f"{name} = {'true' if value else 'false'}")
        elif isinstance(value, str):
            escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
            lines.append(f'{name} = "{escaped}"')
        elif isinstance(value, tuple):
            lines.append(f"{name} = {json.dumps(list(value))}")
        else:
            lines.append(f"{name} = {value!r}")
    return "\n".join(lines) + "\n"


class DefaultsShown(argparse.HelpFormatter):
    """Help that ends each flag's text with its default, where there is one to show: not for a
    flag with no default (None) or one whose text already says it; a switch's as on or off."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if "(default" in text or default in (None, argparse.SUPPRESS) or action.required \
                or not action.option_strings or isinstance(action, (argparse._StoreTrueAction, argparse._AppendAction)):
            return text
        if isinstance(action, argparse.BooleanOptionalAction):
            return f"{text} (default: {'on' if default else 'off'})"
        return f"{text} (default: {_shown(default)})"


def build(cls: type, prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """A parser with ``--config FILE`` and one flag per setting of ``cls``."""
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=epilog)
    p.add_argument("--config", default=argparse.SUPPRESS, metavar="FILE",
                   help="a TOML file of settings (the names of these flags); flags given here override it")
    add_settings(p, cls)
    return p


def parse(parser: argparse.ArgumentParser, cls: type, argv: Sequence[str] | None) -> dict[str, Any]:
    """The settings the user gave: the config file's, overridden by the flags'."""
    values = dict(vars(parser.parse_args(argv)))  # the parser leaves out flags not given
    path = values.pop("config", None)
    return {**(read_toml(path, cls) if path else {}), **values}
