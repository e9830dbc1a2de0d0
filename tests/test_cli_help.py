"""``--help`` says one thing per option: no "(none: X)" beside a different default, and no flag the command lacks."""

from __future__ import annotations

import argparse
import re

import pytest

from jacplug.cli.main import COMMANDS, build_parser


def command_parsers() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return {name: sub.choices[name] for name in COMMANDS}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_no_help_contradicts_its_default(command):
    for action in command_parsers()[command]._actions:
        text = action.help or ""
        default = re.search(r"\(default: (.*)\)$", text)
        if "(none:" in text and default:
            assert default.group(1) == "none", f"{command} {action.option_strings}: {text}"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_flag_a_help_names_exists_in_that_command(command):
    """A flag in backticks names another command's (`jacplug train --workers`); any other is this command's."""
    parser = command_parsers()[command]
    texts = [parser.description or ""] + [action.help or "" for action in parser._actions]
    named = {flag for text in texts for flag in re.findall(r"--[a-z][a-z-]*", re.sub(r"`[^`]*`", "", text))}
    assert named <= set(parser._option_string_actions), named - set(parser._option_string_actions)


def test_help_renders_the_explanations():
    parsers = command_parsers()

    def shown(command: str) -> str:  # as printed, with the line breaks of the terminal's width undone
        return " ".join(parsers[command].format_help().split())

    assert "names and their options: `jacplug plugins`" in shown("train")  # where the loss names are listed
    assert "YAML, TOML or JSON" in shown("train")
    experiment = shown("experiment")
    assert "processes running cells" in experiment and "--loader-workers" in experiment
