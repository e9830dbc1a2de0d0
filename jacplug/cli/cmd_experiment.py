"""``jacplug experiment``: the distillation experiments behind docs/results.md (benchmarks/*.py wrap it).

The flags are made from :class:`jacplug.experiment.config.ExperimentConfig`'s fields (torch-free), so
building the CLI parser stays fast; the experiment itself is imported only when the command runs.
``--config FILE`` (YAML, TOML or JSON, the option names with dashes or underscores) sets any option;
flags given on the command line win.
"""

from __future__ import annotations

import argparse

from ..experiment.config import ExperimentConfig
from ..config_fields import add_options, given_flags, read_options


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_options(p, ExperimentConfig)
    p.add_argument("--config", metavar="FILE", help="YAML, TOML or JSON file with any of these options; flags win")


def add_parser(sub) -> None:
    p = sub.add_parser("experiment", help="distillation experiments: few samples, input noise, a default weight")
    add_arguments(p)
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """Defaults < ``--config FILE`` < flags."""
    file_values = read_options(ExperimentConfig, args.config) if getattr(args, "config", None) else {}
    return ExperimentConfig(**{**file_values, **given_flags(ExperimentConfig, args)})


def run(args: argparse.Namespace) -> int:
    from ..experiment import run_experiment  # start-up time: torch, timm and the whole pipeline

    run_experiment(config_from_args(args))
    return 0
