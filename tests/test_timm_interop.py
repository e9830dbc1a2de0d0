"""What a timm user gets: checkpoints of ``jacplug train`` read by timm's own API, and model listing."""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from timm.data import resolve_data_config

import jacplug
from conftest import tiny_train_args
from jacplug.cli.main import main
from jacplug.errors import UserError
from jacplug.registry import create_dataset

TINY = tiny_train_args()


@pytest.fixture(scope="module")
def student_file(tmp_path_factory, untrained_teacher_checkpoint) -> str:
    """``student_best.safetensors`` of a one-step ``jacplug train`` run on the 8x8 digits (untrained teacher)."""
    out = tmp_path_factory.mktemp("run")
    rc = main(["train", *TINY, "--teacher-checkpoint", untrained_teacher_checkpoint, "--samples-per-class", "1",
               "--epochs", "1", "--max-steps-per-epoch", "1", "--loss", "kd=1", "--out", str(out / "run")])
    assert rc == 0
    return str(out / "run" / "student_best.safetensors")


def digits_data_config() -> dict:
    """The preprocessing `jacplug train` applied, from the dataset itself."""
    splits = create_dataset("digits", image_size=8)
    return {"input_size": (1, 8, 8), "interpolation": "bilinear", "mean": splits.mean, "std": splits.std,
            "crop_pct": 1.0, "crop_mode": "center"}


def test_load_model_gives_timm_the_training_preprocessing(student_file, tiny_resnet):
    model = jacplug.load_model(student_file)
    assert resolve_data_config(model=model) == digits_data_config()
    assert model.pretrained_cfg["num_classes"] == 10 and model.pretrained_cfg["architecture"] == "test_resnet"
    plain = tiny_resnet()
    plain.load_state_dict(load_file(student_file))
    x = torch.randn(2, 1, 8, 8)
    assert torch.equal(model.eval()(x), plain.eval()(x))


def test_timm_alone_loads_the_checkpoint_with_its_pretrained_cfg(student_file):
    """The documented timm-only route: create_model(pretrained=True) with the stored cfg and the file."""
    with safe_open(student_file, framework="pt") as fh:
        meta = fh.metadata()
    overlay = dict(json.loads(meta["pretrained_cfg"]), file=student_file)
    model = timm.create_model(meta["model"], pretrained=True, num_classes=int(meta["num_classes"]),
                              in_chans=int(meta["in_chans"]), pretrained_cfg_overlay=overlay)
    config = resolve_data_config(model=model)
    expected = digits_data_config()
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()} == expected
    weights = load_file(student_file)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def test_load_model_rebuilds_the_cfg_of_older_checkpoints(student_file, tmp_path):
    with safe_open(student_file, framework="pt") as fh:
        meta = {k: v for k, v in fh.metadata().items() if k != "pretrained_cfg"}
    old = tmp_path / "old.safetensors"
    save_file(load_file(student_file), str(old), metadata=meta)
    assert resolve_data_config(model=jacplug.load_model(old)) == digits_data_config()


def test_load_model_refuses_a_file_without_jacplug_metadata(tmp_path):
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(1)}, str(plain))
    with pytest.raises(UserError, match="not written by `jacplug train`"):
        jacplug.load_model(plain)


def test_models_lists_names_by_wildcard(capsys):
    assert main(["models", "resnet1?t"]) == 0
    assert capsys.readouterr().out.split() == sorted(n for n in timm.list_models("resnet1?t"))
    assert main(["models", "no_such_model*"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no model name matches 'no_such_model*'" in err


def test_unknown_model_points_to_the_models_listing(capsys):
    assert main(["train", *TINY[:2], "--student", "resnet1", "--epochs", "1"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'resnet1'" in err and "`jacplug models [PATTERN]`" in err
