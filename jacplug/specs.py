"""The one spec language of the command line: ``NAME:KEY=VALUE,...``.

Every option that names a thing and, optionally, its keyword arguments reads them here, with the same
rules and the same errors (docs/pipeline.md, "Specs: NAME:KEY=VALUE,..."):

- ``--student NAME[:KEY=VALUE,...]`` (``--teacher`` likewise) and ``--student-kwargs KEY=VALUE,...``: a
  model's constructor arguments; in a config file the kwargs may also be a mapping
  (``student-kwargs: {patch_size: 4}``);
- ``--loss NAME=WEIGHT[:KEY=VALUE,...]``: a loss term, its weight and its options
  (:func:`jacplug.losses.presets.parse_spec`);
- ``--log NAME[:KEY=VALUE,...]``: an observer and its options;
- ``jacplug bench --configs``'s models, ``NAME(KEY=VALUE,...)``.

Items are split at the commas outside brackets and quotes, so ``depths=[1,2]`` and ``sep='a,b'`` are one
item each. A value is read as a Python literal, then as YAML: ``4``, ``0.1``, ``1e-3``, ``true``/``True``,
``null``/``None``/``none``, ``[1, 2]``, ``'a,b'``; anything else is a string (``act_layer=gelu``). Values
must be JSON values (tuples become lists), because ``config.json`` and the checkpoints record them and
``--resume`` compares them.
"""

from __future__ import annotations

import ast
import json
from typing import Any

import yaml

from .errors import UserError

#: model option -> the option that holds its kwargs
KWARGS_OPTIONS = {"student": "student_kwargs", "teacher": "teacher_kwargs"}

#: the forms of the options that take specs, as their errors quote them
KWARGS_FORM = "KEY=VALUE,... (e.g. patch_size=4,depth=2)"
MODEL_FORM = "NAME or NAME:KEY=VALUE,... (e.g. resnet18 or vit_tiny_patch16_224:patch_size=4,depth=2)"
OBSERVER_FORM = "NAME or NAME:KEY=VALUE,... (e.g. tensorboard or mlflow:tracking_uri=URI)"

#: spellings of ``None`` besides Python's ``None`` and YAML's ``null``/``~``: ``--loss`` has always read
#: ``none`` so (``backend=none``), and a spec written for it must keep its meaning
_NONE = ("none",)


def spec_error(flag: str, spec: str, problem: str, form: str) -> UserError:
    """The one error of a bad spec: the flag, what the user typed, what is wrong with it, the right form."""
    return UserError(f"{flag} {spec!r}: {problem}; expected {form}")


def split_items(text: str, flag: str, spec: str, form: str) -> list[str]:
    """Split ``a=1,b=[1,2],c='x,y'`` at the commas outside brackets and quotes; an unclosed bracket or
    quote is an error, since the item boundaries would be guesses."""
    items, closers, quote, start = [], [], "", 0
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            closers.append(")]}"["([{".index(ch)])
        elif ch in ")]}":
            if not closers or closers.pop() != ch:
                raise spec_error(flag, spec, f"{ch!r} closes no bracket", form)
        elif ch == "," and not closers:
            items.append(text[start:i])
            start = i + 1
    if quote:
        raise spec_error(flag, spec, f"the quote {quote} is not closed", form)
    if closers:
        raise spec_error(flag, spec, f"a bracket is not closed (no {closers[-1]!r})", form)
    items.append(text[start:])
    return [item.strip() for item in items if item.strip()]


def parse_value(text: str, where: str) -> Any:
    """A Python literal, else a YAML scalar or flow collection, else the text itself; as a JSON value."""
    if text.strip() in _NONE:
        return None
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
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


def parse_options(text: str, flag: str, spec: str | None = None, form: str = KWARGS_FORM) -> dict[str, Any]:
    """``"key=value,key=value"`` -> ``{key: value}`` (see the module docstring for the values); ``spec`` is
    the whole text the user typed, which errors quote (``text`` itself when not given)."""
    spec = text if spec is None else spec
    options: dict[str, Any] = {}
    for item in split_items(text, flag, spec, form):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key.isidentifier():
            raise spec_error(flag, spec, f"{item!r} is not KEY=VALUE with KEY a Python name", form)
        if key in options:
            raise spec_error(flag, spec, f"{key!r} is given twice", form)
        options[key] = parse_value(value.strip(), f"{flag} {spec!r}: {key}")
    return options


def parse_named(spec: str, flag: str, form: str) -> tuple[str, dict[str, Any]]:
    """``"NAME:key=value,..."`` -> ``(name, options)``; a plain name has none."""
    name, sep, rest = spec.partition(":")
    name = name.strip()
    if not name:
        raise spec_error(flag, spec, "no name before the options", form)
    return name, (parse_options(rest, flag, spec, form) if sep else {})


def kwargs_option(value: Any, option: str) -> dict[str, Any]:
    """A kwargs option as a dict: from ``key=value,...`` text or from a config file's mapping."""
    if value is None:
        return {}
    if isinstance(value, str):
        return parse_options(value, option)
    if isinstance(value, dict):
        bad = [k for k in value if not (isinstance(k, str) and k.isidentifier())]
        if bad:
            raise UserError(f"{option}: keys must be Python identifiers, got {bad[0]!r}")
        return {k: as_json_value(v, f"{option} {k}") for k, v in value.items()}
    raise UserError(f"{option} must be key=value text or a mapping, got {value!r}")


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
            name, from_spec = parse_named(spec, f"--{model}", MODEL_FORM)
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
