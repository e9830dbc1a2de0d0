"""The one spec language: ``--loss``, ``--student`` and ``--log`` read a value alike and refuse a bad one alike."""

from __future__ import annotations

import pytest

from jacplug.errors import UserError
from jacplug.losses.presets import parse_spec
from jacplug.specs import merge_options
from jacplug.training.observers import parse_observer


def through_each_flag(options: str) -> dict[str, dict]:
    """``options`` (``KEY=VALUE,...``) as ``--loss``, ``--student`` and ``--log`` read them."""
    return {
        "--loss": parse_spec(f"kd=1:{options}")[2],
        "--student": merge_options({}, {"student": f"test_resnet:{options}"})["student_kwargs"],
        "--log": parse_observer(f"tensorboard:{options}")[1],
    }


@pytest.mark.parametrize("text, value", [
    ("[1,2]", [1, 2]),
    ("[1, 2]", [1, 2]),
    ("(3,4)", [3, 4]),
    ("true", True),
    ("False", False),
    ("0.5", 0.5),
    ("1e-3", 0.001),
    ("7", 7),
    ("'a,b'", "a,b"),
    ('"a,b"', "a,b"),
    ("null", None),
    ("none", None),
    ("None", None),
    ("gelu", "gelu"),
    ("blocks.11>layer3", "blocks.11>layer3"),
    ("sqlite:///runs/a.db", "sqlite:///runs/a.db"),
    ("[layer3, layer4]", ["layer3", "layer4"]),
])
def test_a_value_parses_identically_for_every_flag(text, value):
    parsed = through_each_flag(f"x={text},y=2")
    assert parsed == {flag: {"x": value, "y": 2} for flag in parsed}
    assert all(type(options["x"]) is type(value) for options in parsed.values())


@pytest.mark.parametrize("options, problem", [
    ("x", "'x' is not KEY=VALUE"),
    ("1x=2", "'1x=2' is not KEY=VALUE"),
    ("x=1,x=2", "'x' is given twice"),
    ("x=[1,2", "a bracket is not closed"),
    ("x=1]", "']' closes no bracket"),
    ("x='a,b", "the quote ' is not closed"),
    ("x={1, 2}", "is not a number, boolean, string, null or list"),
])
def test_a_bad_spec_is_one_line_naming_the_flag_and_the_spec(options, problem):
    for flag, spec, read in [("--loss", f"kd=1:{options}", parse_spec),
                             ("--student", f"test_resnet:{options}", lambda spec: merge_options({}, {"student": spec})),
                             ("--log", f"tensorboard:{options}", parse_observer)]:
        with pytest.raises(UserError) as info:
            read(spec)
        text = str(info.value)
        assert "\n" not in text and text.startswith(f"{flag} {spec!r}: ") and problem in text, text
