"""The argument parser of every jacplug command: argparse, with its errors as one line.

Why: argparse prints a usage block of 8 to 22 lines and exits for a bad value (``--steps abc``) or
choice (``--methods kd+jacobain``); every other jacplug error is one line naming what was wrong and
what would be right, so these are too, raised as :class:`UsageError` for the CLI to print.
"""

from __future__ import annotations

import argparse

from ..errors import UserError, close_matches


class UsageError(UserError):
    """A command line argparse refused: a bad type or choice, a missing or unknown option."""


class Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line like every other jacplug error (no usage block), and close
    matches for a bad choice. Sub-command parsers are of this class too (argparse copies the class)."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")

    def _check_value(self, action: argparse.Action, value: object) -> None:
        if action.choices is not None and value not in action.choices:
            choices = [str(c) for c in action.choices]
            near = close_matches(str(value), choices, n=3)
            hint = f"did you mean {', '.join(map(repr, near))}? " if near else ""
            raise argparse.ArgumentError(action, f"invalid choice {value!r}; {hint}choose from {', '.join(choices)}")
