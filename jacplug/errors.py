"""Exceptions a user can cause, kept apart from bugs.

Every subclass of :class:`UserError` is caught by the CLI, printed as one line and turned into exit
code 2: the message itself must say what was wrong and what would be right.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class UserError(Exception):
    """A problem with the user's input (names, paths, shapes, weights, checkpoints).

    Every subclass survives pickling whatever its constructor takes: an error raised in a worker
    process (``jacplug experiment``'s pool) reaches the parent as itself, with its message. Pickle
    would otherwise rebuild it by calling the constructor with the message alone, which fails for a
    constructor with other arguments, and a pool's result thread that fails that way leaves its
    parent waiting forever.
    """

    def __reduce__(self):
        return _rebuild, (type(self), self.args, self.__dict__)


def _rebuild(cls: type, args: tuple, state: dict) -> UserError:
    error = cls.__new__(cls, *args)
    error.args = args
    error.__dict__.update(state)
    return error


class UnknownNameError(UserError, LookupError):
    """A name (model, loss, backend, dataset) that is not registered, with the closest matches."""

    def __init__(self, kind: str, name: str, known: Iterable[str], hint: str = "") -> None:
        self.kind, self.name = kind, name
        self.suggestions = close_matches(name, known)
        msg = f"unknown {kind} {name!r}"
        if self.suggestions:
            msg += "; did you mean " + ", ".join(repr(s) for s in self.suggestions) + "?"
        if hint:
            msg += f" ({hint})"
        super().__init__(msg)

    def __str__(self) -> str:  # LookupError would otherwise repr() the message
        return self.args[0]


class DuplicateNameError(UserError):
    """The same name registered by two plugins without ``override=True``."""


class PluginError(UserError):
    """A plugin failed to load or raised in a hook (only raised in strict mode)."""


class DetachedLossError(UserError):
    """One or more loss terms have no autograd path to the parameters they should train."""

    def __init__(self, detached: list[str], detail: str = "") -> None:
        self.detached = list(detached)
        msg = (
            "loss term(s) with no gradient path to the parameters: "
            + ", ".join(self.detached)
            + (f" ({detail})" if detail else "")
        )
        super().__init__(msg)


def close_matches(name: str, known: Iterable[str], n: int = 5) -> list[str]:
    """Closest known names, by edit similarity and then by substring, best first."""
    known = list(known)
    lowered = {k.lower(): k for k in known}
    hits = [lowered[m] for m in difflib.get_close_matches(name.lower(), lowered, n=n, cutoff=0.6)]
    if len(hits) < n:
        hits += [k for k in known if name.lower() in k.lower() and k not in hits][: n - len(hits)]
    return hits
