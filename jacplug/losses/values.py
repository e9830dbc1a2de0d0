"""Validation of loss-term options, shared so every term refuses bad values with the same words.

Options arrive from Python calls and from ``--loss NAME=WEIGHT:KEY=VALUE`` specs (:mod:`jacplug.specs`), so a
bad one is a :class:`jacplug.errors.UserError` naming the term, the option, what was given and what is allowed.
"""

from __future__ import annotations

from typing import Sequence

from ..errors import UserError


def positive_int(term: str, option: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or int(value) != value or value < 1:
        raise UserError(f"loss term {term!r}: {option} must be a positive integer, got {value!r}")
    return int(value)


def positive_float(term: str, option: str, value: object, hint: str = "") -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < float("inf"):
        raise UserError(f"loss term {term!r}: {option} must be a finite number > 0, got {value!r}{hint}")
    return float(value)


def boolean(term: str, option: str, value: object) -> bool:
    """``True``/``False`` only: ``bool("maybe")`` is ``True``, so a misspelt spec value would silently
    switch the option on."""
    if not isinstance(value, bool):
        raise UserError(f"loss term {term!r}: {option} must be true or false, got {value!r}")
    return value


def choice(term: str, option: str, value: object, allowed: Sequence[str]) -> str:
    if value not in allowed:
        raise UserError(
            f"loss term {term!r}: {option}={value!r} is not one of {', '.join(repr(a) for a in allowed)}"
        )
    return str(value)
