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

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        """argparse's, with a close match for a misspelled option (``--stpes``: did you mean --steps?).
        Each sub-command's parser checks its own options, so the match comes from the command typed."""
        namespace, extras = super().parse_known_args(args, namespace)
        known = [name for name in self._option_string_actions if name.startswith("--")]
        for extra in extras:
            if extra.startswith("--"):
                near = close_matches(extra.split("=", 1)[0], known, n=3)
                if near:
                    self.error(f"unrecognized argument {extra}; did you mean {', '.join(near)}?")
        return namespace, extras

    def _check_value(self, action: argparse.Action, value: object) -> None:
        if action.choices is not None and value not in action.choices:
            choices = [str(c) for c in action.choices]
            near = close_matches(str(value), choices, n=3)
            hint = f"did you mean {', '.join(map(repr, near))}? " if near else ""
            raise argparse.ArgumentError(action, f"invalid choice {value!r}; {hint}choose from {', '.join(choices)}")
