"""Building any timm model for the run: constructor kwargs, automatic img_size, the input-size check,
and kwargs recorded in checkpoints so every later load rebuilds the same model.

Models are timm's tiny ``test_*`` models at 8-32 px, plus the two models new users try first
(``vit_tiny_patch16_224`` at 32 px and ``mobilenetv3_small_050``), built and run once each.
"""

from __future__ import annotations

import json

import pytest
import timm
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from jacplug.cli.main import main
from jacplug.errors import UserError
from jacplug.io.checkpoint import save_model
from jacplug.models.build import SIZE_LADDER, build_model
from jacplug.registry import create_dataset

RUN = ["--image-size", "8", "--batch-size", "8", "--seed", "0", "--device", "cpu", "--no-progress",
       "--samples-per-class", "1", "--epochs", "1", "--max-steps-per-epoch", "1", "--loss", "kd=1"]


@pytest.fixture(scope="module")
def digits():
    return {size: create_dataset("digits", image_size=size) for size in (8, 16, 32)}


def test_img_size_follows_the_data_for_models_that_take_it(digits):
    vit = build_model("student", "vit_tiny_patch16_224", digits[32])
    assert vit.kwargs == {"img_size": 32} and vit.module.patch_embed.grid_size == (2, 2)
    assert vit.module(torch.randn(2, 1, 32, 32)).shape == (2, 10)
    cnn = build_model("student", "mobilenetv3_small_050", digits[16])
    assert cnn.kwargs == {} and cnn.module(torch.randn(2, 1, 16, 16)).shape == (2, 10)


def test_user_kwargs_reach_the_constructor_and_win_over_the_automatic_img_size(digits):
    built = build_model("student", "test_vit", digits[8], {"patch_size": 4, "depth": 1})
    assert built.kwargs == {"patch_size": 4, "depth": 1, "img_size": 8}
    assert len(built.module.blocks) == 1 and built.module.patch_embed.grid_size == (2, 2)


def test_unknown_kwarg_names_the_model_and_the_key(digits):
    with pytest.raises(UserError, match="student model 'test_resnet' does not take the keyword argument 'patch_sise'"):
        build_model("student", "test_resnet", digits[8], {"patch_sise": 4})


def test_a_kwarg_the_constructor_rejects_is_a_user_error(digits):
    with pytest.raises(UserError, match=r"could not build teacher 'test_vit' \(patch_size='x'\): TypeError"):
        build_model("teacher", "test_vit", digits[8], {"patch_size": "x"})


def test_too_small_input_names_the_smallest_size_that_works(digits):
    with pytest.raises(UserError) as info:
        build_model("student", "test_convnext", digits[16])
    message = str(info.value)
    assert "student 'test_convnext' cannot run on 16x16 inputs (RuntimeError:" in message
    assert message.endswith("the smallest input size that works is 32 px: pass --image-size 32")
    assert "\n" not in message
    # the claim holds: 32 runs, and no smaller size of the ladder does
    assert build_model("student", "test_convnext", digits[32]).module(torch.zeros(2, 1, 32, 32)).shape == (2, 10)


def test_size_search_rebuilds_models_whose_img_size_is_automatic(digits):
    with pytest.raises(UserError, match="smallest input size that works is 16 px") as info:
        build_model("student", "test_vit", digits[8])  # patch 16 cannot cut an 8 px image
    assert "(img_size" not in str(info.value)  # the automatic img_size is not the user's doing
    with pytest.raises(UserError, match=r"dynamic_img_size=False\) cannot run on 16x16 inputs .*works is 32 px"):
        build_model("student", "test_vit", digits[16], {"img_size": 32, "dynamic_img_size": False})  # only 32 fits


def test_building_and_checking_draws_no_random_numbers(digits):
    torch.manual_seed(0)
    build_model("student", "test_resnet", digits[8])
    after_build = torch.rand(3)
    torch.manual_seed(0)
    timm.create_model("test_resnet", num_classes=10, in_chans=1)
    assert torch.equal(after_build, torch.rand(3))
    torch.manual_seed(0)
    with pytest.raises(UserError):
        build_model("student", "test_convnext", digits[16])
    failed = torch.rand(3)
    torch.manual_seed(0)
    timm.create_model("test_convnext", num_classes=10, in_chans=1)
    assert torch.equal(failed, torch.rand(3))  # the size search rebuilt models under a forked RNG


def test_the_ladder_is_increasing_and_covers_small_inputs():
    assert list(SIZE_LADDER) == sorted(set(SIZE_LADDER)) and SIZE_LADDER[0] == 8 and SIZE_LADDER[-1] == 512


def _meta(path) -> dict:
    with safe_open(str(path), framework="pt") as fh:
        return fh.metadata()


@pytest.fixture(scope="module")
def resnet_teacher(tmp_path_factory) -> str:
    """An untrained ``test_resnet`` teacher checkpoint for 8 px digits (the tests here need no good teacher)."""
    path = tmp_path_factory.mktemp("resnet-teacher") / "teacher.safetensors"
    save_model(path, timm.create_model("test_resnet", num_classes=10, in_chans=1), role="teacher", name="test_resnet",
               num_classes=10, input_shape=(1, 8, 8), mean=(0.0,), std=(1.0,), config={})
    return str(path)


def test_cli_builds_a_token_student_and_its_checkpoints_rebuild_it(tmp_path, capsys, resnet_teacher):
    out = tmp_path / "vit"
    rc = main(["train", "--teacher", "test_resnet", "--teacher-checkpoint", resnet_teacher, "--student", "test_vit:patch_size=4",
               "--student-kwargs", "depth=1", *RUN, "--out", str(out)])
    assert rc == 0, capsys.readouterr().err
    meta = _meta(out / "student_last.safetensors")
    kwargs = json.loads(meta["model_kwargs"])
    assert kwargs == {"patch_size": 4, "depth": 1, "img_size": 8}
    assert json.loads((out / "config.json").read_text())["student_kwargs"] == {"patch_size": 4, "depth": 1}
    # what docs/pipeline.md tells users to do: timm + the recorded kwargs give the same network
    student = timm.create_model(meta["model"], num_classes=int(meta["num_classes"]), in_chans=int(meta["in_chans"]),
                                **kwargs)
    student.load_state_dict(load_file(out / "student_last.safetensors"))
    assert len(student.blocks) == 1
    # --resume rebuilds the same student from config.json and loads the resume state into it (test_vit
    # without the saved kwargs could not even run on 8 px inputs)
    capsys.readouterr()
    assert main(["train", "--out", str(out), "--resume", "--json"]) == 0, capsys.readouterr().err
    assert json.loads(capsys.readouterr().out)["student"] == "test_vit"


@pytest.fixture(scope="module")
def vit_teacher(tmp_path_factory) -> str:
    """A ``test_vit`` teacher with non-default kwargs, trained for a single step."""
    out = tmp_path_factory.mktemp("vit-teacher")
    rc = main(["train", "--teacher", "test_vit", "--teacher-kwargs", "patch_size=4,depth=1", "--teacher-epochs", "1",
               "--student", "test_resnet", *RUN, "--batch-size", "512", "--out", str(out)])
    assert rc == 0
    assert json.loads(_meta(out / "teacher.safetensors")["model_kwargs"]) == {"patch_size": 4, "depth": 1, "img_size": 8}
    return str(out / "teacher.safetensors")


def test_a_teacher_checkpoint_rebuilds_the_model_it_records(tmp_path, capsys, vit_teacher):
    rc = main(["train", "--teacher", "test_vit", "--teacher-checkpoint", vit_teacher, "--student", "test_resnet", *RUN,
               "--out", str(tmp_path / "run")])
    assert rc == 0, capsys.readouterr().err  # without --teacher-kwargs: the checkpoint's own kwargs


def test_a_teacher_checkpoint_with_other_kwargs_is_refused_before_training(tmp_path, capsys, vit_teacher):
    capsys.readouterr()
    rc = main(["train", "--teacher", "test_vit:patch_size=2,depth=1", "--teacher-checkpoint", vit_teacher,
               "--student", "test_resnet", *RUN, "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "holds a model built with kwargs" in err and "'patch_size': 4" in err and "'patch_size': 2" in err


def test_check_command_takes_kwargs(capsys):
    rc = main(["check", "--teacher", "test_resnet", "--student", "test_vit", "--student-kwargs", "patch_size=4,depth=1",
               "--image-size", "8", "--batch-size", "2", "--loss", "kd=1"])
    assert rc == 0 and "test_resnet -> test_vit" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--student", "test_convnext"], "student 'test_convnext' cannot run on 8x8 inputs"),
    (["--teacher", "test_convnext"], "teacher 'test_convnext' cannot run on 8x8 inputs"),
    (["--student-kwargs", "widht=2"], "does not take the keyword argument 'widht'"),
    (["--student", "test_resnet:depth"], "--student 'test_resnet:depth': 'depth' is not KEY=VALUE"),
])
def test_cli_model_errors_are_one_line_and_come_before_training(tmp_path, capsys, args, message):
    out = tmp_path / "run"
    capsys.readouterr()
    rc = main(["train", "--teacher", "test_resnet", "--student", "test_resnet", "--teacher-epochs", "1", *RUN,
               *args, "--out", str(out)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err, err
    assert not (out / "teacher.safetensors").exists()  # nothing was trained


def test_a_metaformer_builds_and_checks_through_the_cli(digits, capsys):
    """timm's MetaFormer family takes **kwargs and words its refusal of img_size in its own way: whether a
    model takes img_size comes from its class's signature, so PoolFormer builds without it."""
    from jacplug.cli.main import main

    built = build_model("student", "poolformer_s12", digits[32])
    assert "img_size" not in built.kwargs
    assert main(["check", "--teacher", "test_resnet", "--student", "poolformer_s12", "--image-size", "32",
                 "--loss", "kd=1", "--loss", "jacobian=1"]) == 0
    assert "jacobian" in capsys.readouterr().out


def test_a_model_rebuilt_for_img_size_has_the_weights_of_a_single_build(digits):
    import timm

    torch.manual_seed(3)
    built = build_model("student", "test_vit", digits[32])
    assert built.kwargs == {"img_size": 32}
    torch.manual_seed(3)
    direct = timm.create_model("test_vit", num_classes=10, in_chans=1, img_size=32)
    for a, b in zip(built.module.state_dict().values(), direct.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_a_distilled_levit_takes_img_size_from_its_base_class(capsys):
    """timm's ``levit_128s`` is a ``LevitDistilled``, whose ``__init__`` takes only ``**kwargs`` and hands
    them to ``Levit.__init__(img_size=...)``: it builds at the run's size, through the CLI too."""
    built = build_model("student", "levit_128s", create_dataset("digits", image_size=64))
    assert type(built.module).__name__ == "LevitDistilled" and built.kwargs == {"img_size": 64}
    assert main(["check", "--teacher", "test_resnet", "--student", "levit_128s", "--image-size", "64",
                 "--batch-size", "2", "--loss", "kd=1", "--loss", "jacobian=1"]) == 0
    assert "test_resnet -> levit_128s" in capsys.readouterr().out
