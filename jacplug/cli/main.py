"""Entry point: builds the parser from one small module per command and maps user errors to exit 2.

Each command module exposes ``add_parser(subparsers)`` and ``run(args) -> int``; it is imported only
to build the parser, and its heavy imports (torch, timm) happen inside ``run``. Plugins add their own
commands through the ``register_commands`` hook, the same way.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from .._version import __version__
from ..errors import UserError
from ..registry import get_host
from .parser import Parser


#: command name -> module under jacplug.cli
COMMANDS = {
    "plugins": "jacplug.cli.cmd_plugins",
    "models": "jacplug.cli.cmd_models",
    "train": "jacplug.cli.cmd_train",
    "check": "jacplug.cli.cmd_check",
    "plot": "jacplug.cli.cmd_plot",
    "bench": "jacplug.cli.cmd_bench",
    "experiment": "jacplug.cli.cmd_experiment",
}


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="jacplug",
        description="Jacobian-matching knowledge distillation for PyTorch.",
    )
    parser.add_argument("--version", action="version", version=f"jacplug {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, module in COMMANDS.items():
        importlib.import_module(module).add_parser(sub)
    get_host().each("register_commands", subparsers=sub)
    return parser


def _format_warning(message, category, filename, lineno, line=None) -> str:
    return f"jacplug: warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _format_warning
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        parser = build_parser()  # loads the plugins, which strict mode makes fatal
        args = parser.parse_args(argv)
        args.argv = argv[argv.index(args.command) + 1:]  # the command's own arguments, for a second parse
        return int(args.run(args) or 0)
    except UserError as exc:
        if _quiet_rank():
            return 2  # every rank checks the same options: rank 0 says it once
        print(f"jacplug: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("jacplug: interrupted", file=sys.stderr)
        return 130


def _quiet_rank() -> bool:
    """Under torchrun, ranks other than 0 leave the error line to rank 0 (each would print the same)."""
    return os.environ.get("WORLD_SIZE", "1") != "1" and os.environ.get("RANK", "0") != "0"


if __name__ == "__main__":
    raise SystemExit(main())
