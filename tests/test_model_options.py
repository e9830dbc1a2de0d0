"""Model constructor kwargs from flags, ``NAME:key=val`` specs and config files; their precedence and resume."""

from __future__ import annotations

import pytest

from jacplug.cli.cmd_train import resolve_config
from jacplug.cli.main import build_parser
from jacplug.errors import UserError
from jacplug.training.config import for_resume, resolve
from jacplug.specs import MODEL_FORM, merge_options, parse_named, parse_options


def test_values_are_read_as_python_or_yaml_literals():
    text = "patch_size=4,drop_rate=0.1,lr=1e-3,a=true,b=False,act_layer=gelu,depths=[1, 2],c=(3,4),d=null,e='x,y'"
    assert parse_options(text, "--student-kwargs") == {
        "patch_size": 4, "drop_rate": 0.1, "lr": 0.001, "a": True, "b": False, "act_layer": "gelu",
        "depths": [1, 2], "c": [3, 4], "d": None, "e": "x,y",
    }


@pytest.mark.parametrize("text, message", [
    ("patch_size", "'patch_size' is not KEY=VALUE"),
    ("1x=2", "'1x=2' is not KEY=VALUE"),
    ("depth=2,depth=3", "'depth' is given twice"),
    ("s={1, 2}", "is not a number, boolean, string, null or list"),
    ("v=[1, 2", "a bracket is not closed (no ']')"),
    ("v=]", "']' closes no bracket"),
    ("v='a,b", "the quote ' is not closed"),
])
def test_malformed_kwargs_are_user_errors(text, message):
    with pytest.raises(UserError) as info:
        parse_options(text, "--student-kwargs")
    assert message in str(info.value) and "\n" not in str(info.value)


def test_a_spec_splits_into_name_and_kwargs():
    assert parse_named("vit_tiny_patch16_224:patch_size=4,depth=2", "--student", MODEL_FORM) == (
        "vit_tiny_patch16_224", {"patch_size": 4, "depth": 2})
    assert parse_named("resnet18", "--student", MODEL_FORM) == ("resnet18", {})


def test_spec_and_flag_agree_or_fail():
    merged = merge_options({}, {"student": "test_vit:depth=2", "student_kwargs": "patch_size=4,depth=2"})
    assert merged["student"] == "test_vit" and merged["student_kwargs"] == {"depth": 2, "patch_size": 4}
    with pytest.raises(UserError, match="give 'depth' different values"):
        merge_options({}, {"student": "test_vit:depth=2", "student_kwargs": "depth=3"})


def test_file_mapping_and_flags_merge_key_by_key(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("student: test_vit\nstudent-kwargs: {patch_size: 4, depth: 2}\nteacher: 'test_vit:depth=1'\n")
    args = build_parser().parse_args(["train", "--config", str(path), "--student-kwargs", "depth=3"])
    config = resolve_config(args)
    assert config.student == "test_vit" and config.student_kwargs == {"patch_size": 4, "depth": 3}
    assert config.teacher == "test_vit" and config.teacher_kwargs == {"depth": 1}
    assert resolve({}, {}).student_kwargs == {} and resolve({}, {}).teacher_kwargs == {}


def test_a_config_file_kwargs_value_of_the_wrong_type_is_refused():
    with pytest.raises(UserError, match="--student-kwargs must be key=value text or a mapping"):
        resolve({"student_kwargs": 5}, {})


def test_resume_accepts_the_same_kwargs_and_refuses_others():
    saved = resolve({}, {"student": "test_vit:patch_size=4", "out": "r"}).to_dict()
    kept = for_resume(saved, {"student": "test_vit", "student_kwargs": "patch_size=4"}, "r")
    assert kept.student_kwargs == {"patch_size": 4} and kept.resume
    with pytest.raises(UserError, match="--student-kwargs"):
        for_resume(saved, {"student": "test_vit:patch_size=8"}, "r")
