"""One configuration mechanism for every command: the flags of ``train``, ``experiment`` and ``bench`` are
made from their dataclasses' fields, so a command's ``--help`` and its config files accept exactly the same
names, a file round-trips every default, flags win over the file, and bad keys or values are one line."""

from __future__ import annotations

import argparse
import dataclasses
import json

import pytest

from jacplug.bench import BenchConfig
from jacplug.cli.main import build_parser
from jacplug.errors import UserError
from jacplug.experiment.config import ExperimentConfig
from jacplug.config_fields import given_flags, options_of, read_options
from jacplug.training.config import TrainConfig

COMMANDS = {"train": (TrainConfig, {"--config", "--json"}), "experiment": (ExperimentConfig, {"--config"}),
            "bench": (BenchConfig, {"--config"})}


def command_parser(name: str) -> argparse.ArgumentParser:
    sub = next(a for a in build_parser()._subparsers._group_actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[name]


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_and_config_files_accept_the_same_names(command):
    cls, cli_only = COMMANDS[command]
    flags = {s for action in command_parser(command)._actions for s in action.option_strings
             if s.startswith("--") and not s.startswith("--no-") and s != "--help"}
    assert flags - cli_only == {"--" + name.replace("_", "-") for name in options_of(cls)}
    assert set(options_of(cls)) == {f.name for f in dataclasses.fields(cls)}  # every field is an option


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_file_with_every_default_reads_back_as_the_defaults(command, tmp_path):
    cls, _ = COMMANDS[command]
    defaults = dataclasses.asdict(cls())
    written = {}
    for name, field in options_of(cls).items():
        value = defaults[name]
        if field.metadata["single"]:  # a count on the command line and in files
            value = len(value)
        written[name.replace("_", "-")] = value
    path = tmp_path / "all.json"
    path.write_text(json.dumps(written))
    assert cls(**read_options(cls, path)) == cls()


def test_flags_win_over_the_file_and_bad_files_are_one_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("steps: 5\nlr: 0.01\nloss: kd=1\n")
    args = command_parser("train").parse_args(["--config", str(path), "--steps", "9"])
    merged = {**read_options(TrainConfig, path), **given_flags(TrainConfig, args)}
    assert (merged["steps"], merged["lr"], merged["loss"]) == (9, 0.01, ["kd=1"])
    for text, message in [("stpes: 3\n", "unknown option 'stpes'; did you mean steps"),
                          ("lr: fast\n", "option 'lr' must be a number, got 'fast'"),
                          ("augment: 1\n", "option 'augment' must be true or false, got 1"),
                          ("cuda-graphs: sometimes\n", "'sometimes', not one of auto, on, off")]:
        path.write_text(text)
        with pytest.raises(UserError, match=message):
            read_options(TrainConfig, path)


def test_an_experiment_writes_none_of_trains_defaults_again():
    from jacplug.experiment.config import EXPERIMENT_DEFAULTS, OWN_MEANING, SHARED

    def default(field: dataclasses.Field):
        return field.default_factory() if field.default is dataclasses.MISSING else field.default

    train = {f.name: f for f in dataclasses.fields(TrainConfig)}
    shared = [f for f in dataclasses.fields(ExperimentConfig) if f.name in train and f.name not in OWN_MEANING]
    assert [f.name for f in shared] == list(SHARED) and len(SHARED) >= 15
    for field in shared:  # declared from train's own field: its help and default unless the table differs (then
        # train's help, which explains train's default, would contradict the experiment's)
        if field.name not in EXPERIMENT_DEFAULTS:
            assert field.metadata["help"] == train[field.name].metadata["help"], field.name
        assert default(field) == EXPERIMENT_DEFAULTS.get(field.name, default(train[field.name])), field.name
    for name, value in EXPERIMENT_DEFAULTS.items():  # the table holds only real differences
        assert value != default(train[name]), name

    experiment = ExperimentConfig(batch_size=16, lr=1e-3, log=["tensorboard"])
    cell = experiment.train_config(seed=7, samples_per_class=5, loss=["kd=1"])
    assert isinstance(cell, TrainConfig) and (cell.seed, cell.samples_per_class, cell.loss) == (7, 5, ["kd=1"])
    assert all(getattr(cell, name) == getattr(experiment, name) for name in SHARED)
    assert cell.validate() is cell
