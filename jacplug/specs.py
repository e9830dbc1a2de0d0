"""Model keyword arguments from the command line and config files.

A model is chosen by name and, optionally, keyword arguments for its constructor, given either as
``--student-kwargs patch_size=4,depth=2`` (``--teacher-kwargs`` likewise) or inside the name,
``--student vit_tiny_patch16_224:patch_size=4,depth=2``. In a config file the kwargs may also be a
mapping (``student-kwargs: {patch_size: 4}``). Values are read as Python literals, then as YAML
scalars: ``4``, ``0.1``, ``1e-3``, ``true``/``True``, ``null``/``None``, ``[1, 2]``, and anything else is a
string (``act_layer=gelu``). They must be JSON values, because ``config.json`` and the checkpoints
record them and ``--resume`` compares them.
"""

from __future__ import annotations

import ast
import json
from typing import Any

from .errors import UserError

#: model option -> the option that holds its kwargs
KWARGS_OPTIONS = {"student": "student_kwargs", "teacher": "teacher_kwargs"}


def _split_items(text: str) -> list[str]:
    """Split ``a=1,b=[1,2]`` at the commas outside brackets and quotes."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def parse_value(text: str, where: str) -> Any:
    """A Python literal, else a YAML scalar or flow collection, else the text itself; as a JSON value."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        import yaml

        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise UserError(f"{where}: could not read the value {text!r} ({' '.join(str(exc).split())})") from exc
    return as_json_value(value, where)


def as_json_value(value: Any, where: str) -> Any:
    """``value`` with tuples as lists; other non-JSON values (sets, bytes, complex) are an error."""
    try:
        return json.loads(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise UserError(
            f"{where}: {value!r} is not a number, boolean, string, null or list of them"
        ) from exc


def parse_kwargs(text: str, option: str) -> dict[str, Any]:
    """``"key=value,key=value"`` -> ``{key: value}`` (see the module docstring for the values)."""
    kwargs: dict[str, Any] = {}
    for item in _split_items(text):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise UserError(f"{option}: expected key=value items separated by commas, got {item!r} in {text!r}")
        if key in kwargs:
            raise UserError(f"{option}: {key!r} is given twice in {text!r}")
        kwargs[key] = parse_value(value.strip(), f"{option} {key}")
    return kwargs


def kwargs_option(value: Any, option: str) -> dict[str, Any]:
    """A kwargs option as a dict: from ``key=value,...`` text or from a config file's mapping."""
    if value is None:
        return {}
    if isinstance(value, str):
        return parse_kwargs(value, option)
    if isinstance(value, dict):
        bad = [k for k in value if not (isinstance(k, str) and k.isidentifier())]
        if bad:
            raise UserError(f"{option}: keys must be Python identifiers, got {bad[0]!r}")
        return {k: as_json_value(v, f"{option} {k}") for k, v in value.items()}
    raise UserError(f"{option} must be key=value text or a mapping, got {value!r}")


def split_spec(spec: str, option: str) -> tuple[str, dict[str, Any]]:
    """``"name:key=value,..."`` -> ``(name, kwargs)``; a plain name has no kwargs."""
    name, sep, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise UserError(f"{option}: {spec!r} names no model")
    return name, (parse_kwargs(rest, option) if sep else {})


def model_options(options: dict[str, Any]) -> dict[str, Any]:
    """One source's options (a config file, or the flags) with every model spec split: ``student``
    becomes the bare name and ``student_kwargs`` a dict holding the spec's kwargs and the source's own
    ``student_kwargs``. A key given both ways, with different values, is an error."""
    result = dict(options)
    for model, field in KWARGS_OPTIONS.items():
        flag = f"--{field.replace('_', '-')}"
        given = kwargs_option(result.get(field), flag)
        spec = result.get(model)
        if isinstance(spec, str):
            name, from_spec = split_spec(spec, f"--{model}")
            clash = [k for k in from_spec if k in given and given[k] != from_spec[k]]
            if clash:
                raise UserError(
                    f"--{model} {spec!r} and {flag} give {clash[0]!r} different values "
                    f"({from_spec[clash[0]]!r} and {given[clash[0]]!r}); give it once"
                )
            result[model], given = name, {**given, **from_spec}
        if field in result or given:
            result[field] = given
    return result


def merge_options(file_options: dict[str, Any], cli_options: dict[str, Any]) -> dict[str, Any]:
    """File options, then every flag the user gave (not ``None``); model kwargs merge key by key,
    so ``--student-kwargs depth=2`` adds to (or overrides one key of) the file's ``student-kwargs``."""
    file_side = model_options(file_options)
    cli_side = model_options({k: v for k, v in cli_options.items() if v is not None})
    merged = {**file_side, **cli_side}
    for field in KWARGS_OPTIONS.values():
        if field in file_side or field in cli_side:
            merged[field] = {**file_side.get(field, {}), **cli_side.get(field, {})}
    return merged
