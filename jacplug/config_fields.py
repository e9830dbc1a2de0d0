"""A command's options declared once, on a dataclass: its flags, its config files and its defaults all come
from the same fields.

Why: with flags written out by hand beside a dataclass, every option was spelled, typed and defaulted in
two places (and a config-file reader guessed types from their names); a new option reached one and not
the other. Here a field declared with :func:`option` carries its help text and how one command-line item
is read; :func:`add_options` makes the argparse flags from the fields (names, types from the
annotations, defaults in the help, booleans as ``--x/--no-x``), :func:`read_options` reads a YAML, TOML
or JSON file with the same names (dashes or underscores; unknown names get close matches; each value
checked against the field's annotation), and :func:`given_flags` returns what the user typed.
Precedence is the caller's: dataclass defaults < file < flags.

Torch-free, so building the command line stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import types
import typing
from pathlib import Path
from typing import Any, Callable

import yaml

from .errors import UserError, close_matches

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, published as the tomli distribution
    import tomli as tomllib


def option(default: Any = dataclasses.MISSING, *, help: str, default_factory: Any = dataclasses.MISSING,
           metavar: str | None = None, choices: tuple | None = None, item: Callable[[str], Any] | None = None,
           convert: Callable[[Any], Any] | None = None, repeat: bool = False, single: bool = False,
           const: Any = None, group: str | None = None) -> Any:
    """A dataclass field that is also a command-line option and a config-file key.

    ``item``: reads one command-line item (default: the annotation's ``int``/``float``/``str``);
    ``convert``: turns a flag's or a file's value into the field's value (e.g. a seed count into a list);
    ``repeat``: a list given by repeating the flag (``--loss a --loss b``) rather than ``--x a b``;
    ``single``: a list field whose flag takes one item, which ``convert`` turns into the list (a count);
    ``const``: the flag's value may be left out, and then is ``const`` (``--resume`` or ``--resume auto``);
    ``group``: the heading the flag is listed under in ``--help``."""
    metadata = {"help": help, "metavar": metavar, "choices": choices, "item": item, "convert": convert,
                "repeat": repeat, "single": single, "const": const, "group": group}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def options_of(cls: type) -> dict[str, dataclasses.Field]:
    """The fields of ``cls`` declared with :func:`option`, by name."""
    return {f.name: f for f in dataclasses.fields(cls) if "help" in f.metadata}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_options(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per option of ``cls``, with ``default=None`` so that :func:`given_flags` can tell what was
    typed (the dataclass default is shown in the help)."""
    hints = typing.get_type_hints(cls)
    groups: dict[str, Any] = {}
    for name, field in options_of(cls).items():
        meta = field.metadata
        target = parser
        if meta["group"]:
            target = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        base, is_list = _base_type(hints[name])
        text = f"{meta['help']} (default: {_shown(field)})".replace("%", "%%")  # argparse formats help with %
        kwargs: dict[str, Any] = {"dest": name, "default": None, "help": text}
        if meta["metavar"]:
            kwargs["metavar"] = meta["metavar"]
        if meta.get("const") is not None:
            kwargs.update(nargs="?", const=meta["const"], type=meta["item"] or str)
        elif base is bool:
            kwargs["action"] = argparse.BooleanOptionalAction
        else:
            kwargs["type"] = meta["item"] or (base if base in (int, float) else str)
            if meta["choices"]:
                kwargs["choices"] = meta["choices"]
            if is_list and not meta["single"]:
                kwargs["action" if meta["repeat"] else "nargs"] = "append" if meta["repeat"] else "+"
        target.add_argument(flag(name), **kwargs)


def given_flags(cls: type, namespace: argparse.Namespace) -> dict[str, Any]:
    """The options the user gave as flags (not ``None``), each through its ``convert``."""
    values = {}
    for name, field in options_of(cls).items():
        value = getattr(namespace, name, None)
        if value is not None:
            convert = field.metadata["convert"]
            values[name] = convert(value) if convert else value
    return values


def read_options(cls: type, path: str | Path) -> dict[str, Any]:
    """The options of a ``.yaml``/``.yml``/``.toml``/``.json`` file, keys as field names, each value
    converted and checked against its field's annotation; unknown keys are a one-line error with close
    matches (a typo must not silently fall back to a default)."""
    known = options_of(cls)
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for key, value in read_mapping(path).items():
        name = str(key).replace("-", "_")
        if name not in known:
            near = close_matches(name.replace("_", "-"), [n.replace("_", "-") for n in known])
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise UserError(f"config file {str(path)!r}: unknown option {key!r}{hint}")
        meta = known[name].metadata
        base, is_list = _base_type(hints[name])
        if meta["convert"] and value is not None:
            value = meta["convert"](value)
        if is_list and value is not None and not isinstance(value, list):
            value = [value]  # one value where a list is expected (``loss: kd=1``)
        check_value(name, value, hints[name], f"config file {str(path)!r}")
        if meta["choices"] and value is not None:
            bad = [v for v in (value if isinstance(value, list) else [value]) if v not in meta["choices"]]
            if bad:
                raise UserError(f"config file {str(path)!r}: option {key!r} has {bad[0]!r}, not one of "
                                f"{', '.join(map(str, meta['choices']))}")
        values[name] = value
    return values


def check_value(name: str, value: Any, annotation: Any, where: str) -> None:
    """A one-line error unless ``value`` fits ``annotation`` (``int``, ``float``, ``bool``, ``str``,
    ``dict``, ``list[...]``, each optionally ``| None``)."""
    if value is None:
        if not _admits_none(annotation):
            raise UserError(f"{where}: option {name.replace('_', '-')!r} cannot be null; give a value, or leave the "
                            "option out for its default")
        return
    base, is_list = _base_type(annotation)
    items = value if is_list else [value]
    if is_list and not isinstance(value, list):
        ok = False
    elif base is dict:
        ok = isinstance(value, (dict, str))  # a mapping, or key=value,... text (model kwargs)
    elif len(_members(annotation)) > 1:
        ok = any(_fits(value, member, member) for member in _members(annotation))  # ``bool | str``
    else:
        ok = all(_fits(item, base, annotation) for item in items)
    if not ok:
        what = {bool: "true or false", int: "an integer", float: "a number", str: "a string",
                dict: "a mapping of keyword arguments"}.get(base, str(annotation))
        raise UserError(f"{where}: option {name.replace('_', '-')!r} must be {'a list of ' if is_list else ''}"
                        f"{what}, got {value!r}")


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a ``.yaml``/``.yml``/``.toml``/``.json`` file, with one-line errors
    for a missing file, an unknown format, a parse error or a file that holds no mapping."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"config file {str(path)!r} is a directory; pass the .yaml, .toml or .json file in it")
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"config file {str(path)!r} is not UTF-8 text (byte {exc.start} cannot be decoded); "
                        "pass a YAML, TOML or JSON text file") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            data = _load_yaml(text, path) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise UserError(f"config file {str(path)!r}: expected a .yaml, .yml, .toml or .json file")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise UserError(f"config file {str(path)!r} could not be parsed: {exc}") from exc
    except yaml.YAMLError as exc:
        raise UserError(f"config file {str(path)!r} could not be parsed: {' '.join(str(exc).split())}") from exc
    if not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping of option names to values")
    return data


def _members(annotation: Any) -> list[Any]:
    """The non-None members of a union (``[annotation]`` for anything else)."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return [a for a in typing.get_args(annotation) if a is not type(None)]
    return [annotation]


def _load_yaml(text: str, path: Path) -> Any:
    """``yaml.safe_load``, except that a key given twice in one mapping is an error naming it: PyYAML
    keeps the last value silently, so a pasted-over option would lose its first value unnoticed."""
    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen: dict = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise UserError(f"config file {str(path)!r}: key {key!r} is given twice (lines {seen[key]} and "
                                    f"{key_node.start_mark.line + 1}); keep one")
                seen[key] = key_node.start_mark.line + 1
            return super().construct_mapping(node, deep)

    return yaml.load(text, Loader=UniqueKeyLoader)


def _base_type(annotation: Any) -> tuple[Any, bool]:
    """``(element type, is a list)`` of an annotation, ``None`` and unions with ``None`` unwrapped; a
    union of several types (``int | None`` inside a list) gives its first non-None member."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return _base_type(args[0])
    origin = typing.get_origin(annotation)
    if origin is list:
        element, _ = _base_type(args[0]) if args else (str, False)
        return element, True
    if origin is dict:
        return dict, False
    return annotation, False


def _admits_none(annotation: Any) -> bool:
    return annotation is type(None) or type(None) in typing.get_args(annotation) and (
        isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union)


def _fits(value: Any, base: Any, annotation: Any) -> bool:
    if value is None:
        return True  # list elements may be None where the annotation allows it (``int | None``)
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if base is str:
        return isinstance(value, str)
    return True


def _shown(field: dataclasses.Field) -> str:
    if field.default is not dataclasses.MISSING:
        value = field.default
    elif field.default_factory is not dataclasses.MISSING:
        value = field.default_factory()
    else:
        return "required"
    if value is None:
        return "none"
    if field.metadata.get("single") and isinstance(value, list):
        return str(len(value))  # the flag takes a count
    if isinstance(value, list):
        return " ".join("all" if v is None else str(v) for v in value) or "none"
    return str(value)
