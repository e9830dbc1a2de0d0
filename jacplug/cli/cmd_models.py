"""``jacplug models [PATTERN]``: the model names ``--teacher`` / ``--student`` accept, one per line.

Like ``timm.list_models(PATTERN)``: shell-style wildcards (``*``, ``?``, ``[...]``), through jacplug's
model registry, so names registered by third-party plugins are listed next to every timm model.
"""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import UserError
from ..registry import registry


def add_parser(sub) -> None:
    p = sub.add_parser("models", help="list model names, e.g. jacplug models 'resnet*'")
    p.add_argument("pattern", nargs="?", default="*", help="shell-style wildcard (default '*': every model)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    names = registry("models").names(args.pattern)
    if not names:
        raise UserError(
            f"no model name matches {args.pattern!r}; patterns are shell-style wildcards and match whole names, "
            f"e.g. 'resnet*' or '*mobilenet*' (`jacplug models` lists every name)"
        )
    try:
        sys.stdout.write("\n".join(names) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        # the reader stopped early (`jacplug models | head`): end quietly, as ls or grep do; point
        # stdout at devnull so the interpreter's final flush does not raise again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0
