"""``jacplug plot RUN_DIR``: draw a run's loss terms and accuracies from its ``metrics.jsonl`` into a PNG."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UserError


def add_parser(sub) -> None:
    p = sub.add_parser("plot", help="plot a run's curves (RUN_DIR/metrics.jsonl) into a PNG")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a jacplug train run directory")
    p.add_argument("--out", metavar="FILE", help="PNG to write (default RUN_DIR/curves.png)")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..training.metrics import plot_curves  # start-up time: it loads torch (through the checkpoint writer)

    if Path(args.run_dir).is_file():
        raise UserError(f"{args.run_dir!r} is a file; pass the run directory that holds metrics.jsonl "
                        f"({str(Path(args.run_dir).parent)!r}?)")
    if not Path(args.run_dir).is_dir():
        raise UserError(f"run directory {args.run_dir!r} does not exist")
    print(plot_curves(args.run_dir, args.out))
    return 0
