"""Bad input a demanding new user tries on the command line: each ends in one line naming what was wrong and
what would be right, exit code 2, before anything is written (no run directory left behind)."""

from __future__ import annotations

import json
import struct
import time
import zlib

import pytest

from image_tree import image_tree
from jacplug.cli.main import main

TINY = ["--teacher", "test_resnet", "--student", "test_resnet"]


def one_line_error(capsys, argv: list[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2, argv
    err = capsys.readouterr().err
    assert err.startswith("jacplug: error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("argv, message", [
    (["--weight-decay", "nan"], "--weight-decay must be a finite number >= 0, got nan"),
    (["--weight-decay", "inf"], "--weight-decay must be a finite number >= 0, got inf"),
    (["--seed", str(2**64)], f"--seed must be an integer from 0 to {2**64 - 1} (64 bits), got {2**64}"),
    (["--seed", "-1"], "--seed must be an integer from 0 to"),
    (["--steps", str(2**63)], f"--steps must be a positive integer up to {2**63 - 1}, got {2**63}"),
    (["--batch-size", "1"], "--batch-size must be at least 2 (train-mode BatchNorm cannot normalise a single sample)"),
    (["--out", ""], "--out is empty; pass a directory"),
    (["--teacher-epochs", "0"], "--teacher-epochs must be a positive integer"),
    (["--teacher-checkpoint", "t.safetensors", "--teacher-steps", "5"],
     "--teacher-steps set how the teacher is trained, but --teacher-checkpoint gives a trained one; drop one of them"),
    (["--teacher-checkpoint", "t.safetensors", "--teacher-lr", "0.1"], "--teacher-lr set how the teacher is trained"),
    (["--stpes", "3"], "unrecognized argument --stpes; did you mean --steps"),
    (["--agreement-images", "-1"], "--agreement-images must be >= 0 (0 switches the measurement off), got -1"),
])
def test_train_refuses_values_that_can_never_work(capsys, tmp_path, monkeypatch, argv, message):
    monkeypatch.chdir(tmp_path)  # an empty --out must not fall back to ./runs
    out = [] if "--out" in argv else ["--out", str(tmp_path / "run")]
    assert message in one_line_error(capsys, ["train", *TINY, *out, *argv])
    assert list(tmp_path.iterdir()) == []


def test_a_config_file_weight_decay_of_nan_is_refused_too(capsys, tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("weight_decay: .nan\n")
    assert "--weight-decay must be a finite number >= 0, got nan" in one_line_error(
        capsys, ["train", "--config", str(config), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, message", [
    (["--lr", "-1"], "--lr must be a finite number > 0, got -1.0"),
    (["--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    (["--teacher-lr", "nan"], "--teacher-lr must be a finite number > 0, got nan"),
    (["--weight-decay", "-0.1"], "--weight-decay must be a finite number >= 0, got -0.1"),
    (["--eval-batch-size", "0"], "--eval-batch-size must be a positive integer"),
    (["--steps", str(2**63)], "--steps must be a positive integer up to"),
    (["--noise-seed", str(2**64)], f"--noise-seed must be integers from 0 to {2**64 - 1} (64 bits), got [{2**64}]"),
    (["--teacher-checkpoint", "t.safetensors", "--teacher-epochs", "3"],
     "--teacher-epochs set how the teacher is trained, but --teacher-checkpoint gives a trained one"),
    (["--out", ""], "--out is empty"),
    (["--agreement-images", "-1"], "--agreement-images must be >= 0 (0 switches the measurement off), got -1"),
    (["--log", "tensorbord"], "unknown run observer 'tensorbord'; did you mean 'tensorboard'?"),
    (["--log-off", "checkpoints"], "the 'checkpoints' observer is essential to a run and cannot be switched off"),
])
def test_experiment_refuses_values_that_can_never_work_before_the_teacher(capsys, tmp_path, argv, message):
    out = [] if "--out" in argv else ["--out", str(tmp_path / "exp")]
    started = time.perf_counter()
    assert message in one_line_error(capsys, ["experiment", *out, *argv])
    assert time.perf_counter() - started < 10 and not (tmp_path / "exp").exists()  # no teacher was trained


def test_experiment_refuses_duplicate_seeds_from_a_config_file(capsys, tmp_path):
    config = tmp_path / "e.json"
    config.write_text(json.dumps({"seeds": [0, 1, 1]}))
    assert "--seeds lists seed(s) [1] more than once; each seed is one independent run" in one_line_error(
        capsys, ["experiment", "--config", str(config), "--out", str(tmp_path / "exp")])
    assert not (tmp_path / "exp").exists()


@pytest.mark.parametrize("command", ["train", "experiment", "bench"])
@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_a_binary_config_file_is_one_line(capsys, tmp_path, command, suffix):
    config = tmp_path / f"c{suffix}"
    config.write_bytes(bytes(range(128, 256)) * 3)
    assert f"config file '{config}' is not UTF-8 text" in one_line_error(capsys, [command, "--config", str(config)])


@pytest.mark.parametrize("text, message", [
    ("batch_size: 8\nsteps: 3\nbatch_size: 16\n", "key 'batch_size' is given twice (lines 1 and 3); keep one"),
    ("batch_size: null\n", "option 'batch-size' cannot be null; give a value, or leave the option out"),
])
def test_config_file_keys_given_twice_or_null_are_refused(capsys, tmp_path, text, message):
    config = tmp_path / "c.yaml"
    config.write_text(text)
    assert message in one_line_error(capsys, ["train", "--config", str(config), "--out", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_a_null_is_still_accepted_where_the_option_takes_none(tmp_path):
    from jacplug.training.config import read_config_file

    config = tmp_path / "c.yaml"
    config.write_text("samples_per_class: null\n")
    assert read_config_file(config) == {"samples_per_class": None}


def test_a_boolean_loss_option_takes_only_true_or_false(capsys):
    assert "loss term 'jacobian': squared must be true or false, got 'maybe'" in one_line_error(
        capsys, ["check", *TINY, "--loss", "jacobian=1:squared=maybe"])


def test_pretrained_offline_fails_at_once_in_one_line(capsys, tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))  # nothing cached
    started = time.perf_counter()
    err = one_line_error(capsys, ["train", *TINY, "--pretrained", "--out", str(tmp_path / "run")])
    assert "--pretrained: the weights of 'test_resnet' (timm/test_resnet.r160_in1k) are not in the local Hugging " \
           "Face cache and HF_HUB_OFFLINE is set" in err
    assert time.perf_counter() - started < 10 and not (tmp_path / "run").exists()


# ---------------------------------------------------------------------------------------------------
# degenerate image folders


def test_an_image_folder_with_one_class_is_refused(capsys, tmp_path):
    root = image_tree(tmp_path / "images", {"all": ["cat"]}, per_class=10) / "all"
    err = one_line_error(capsys, ["train", *TINY, "--dataset", f"imagefolder:{root}", "--out", str(tmp_path / "run")])
    assert "has 1 class sub-folder ('cat'); a classifier needs at least two classes" in err
    assert not (tmp_path / "run").exists()


def test_an_image_folder_too_small_to_split_names_the_images_per_class_needed(capsys, tmp_path):
    root = image_tree(tmp_path / "images", {"all": ["cat", "dog"]}, per_class=1) / "all"
    err = one_line_error(capsys, ["train", *TINY, "--dataset", f"imagefolder:{root}", "--out", str(tmp_path / "run")])
    assert ("is too small to split 80/10/10: the validation and test split(s) would be empty (class 'cat' has 1 "
            "image(s)); give each class at least 8 images, or split them yourself into train/, val/ and test/") in err
    assert not (tmp_path / "run").exists()


def test_eight_images_per_class_fill_every_split(tmp_path):
    from jacplug.registry import create_dataset

    root = image_tree(tmp_path / "images", {"all": ["cat", "dog"]}, per_class=8) / "all"
    splits = create_dataset(f"imagefolder:{root}", image_size=8)
    assert [len(s) for s in (splits.train, splits.val, splits.test)] == [12, 2, 2]


def claim_size(png, width: int, height: int) -> None:
    """Rewrite a PNG's header (IHDR) to claim ``width`` x ``height`` pixels, with a valid checksum."""
    data = bytearray(png.read_bytes())
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    png.write_bytes(bytes(data))


def test_a_decompression_bomb_is_dropped_with_the_documented_warning(tmp_path):
    from jacplug.data.folders import UnreadableImageWarning
    from jacplug.registry import create_dataset

    root = image_tree(tmp_path / "images", {"train": ["a", "b"], "test": ["a", "b"]}, per_class=3)
    claim_size(root / "train" / "a" / "1.png", 30000, 30000)
    with pytest.warns(UnreadableImageWarning, match=r"image '.*train/a/1.png' cannot be read \(Image size "
                                                    r"\(900000000 pixels\) exceeds limit"):
        splits = create_dataset(f"imagefolder:{root}", image_size=8, augment=False)
    assert len(splits.train) == 5 and splits.dropped_images == [str(root / "train" / "a" / "1.png")]


# ---------------------------------------------------------------------------------------------------
# a damaged file of the run itself is named, with the remedy for that file


def test_a_damaged_teacher_or_resume_file_of_the_run_is_named(capsys, tmp_path):
    from jacplug.training.config import resolve

    run = tmp_path / "run"
    run.mkdir()
    config = resolve({}, {"teacher": "test_resnet", "student": "test_resnet", "steps": 2, "teacher_steps": 1,
                          "samples_per_class": 2, "out": str(run), "check_gradients": False})
    (run / "config.json").write_text(config.to_json())
    (run / "teacher.safetensors").write_text("junk")
    err = one_line_error(capsys, ["train", "--resume", "--out", str(run)])
    assert f"checkpoint '{run}/teacher.safetensors' is corrupt" in err and "--teacher-checkpoint" not in err
    assert f"it belongs to the run in '{run}': delete it and run again with --resume" in err
    (run / "teacher.safetensors").unlink()
    (run / "resume.safetensors").write_text("junk")
    capsys.readouterr()
    assert main(["train", "--resume", "--out", str(run)]) == 2  # after training the teacher again (its progress)
    err = capsys.readouterr().err.splitlines()[-1]
    assert f"checkpoint '{run}/resume.safetensors' is corrupt" in err and "--teacher-checkpoint " not in err
    assert "this run's resume state is damaged: delete it to restart the student phase with --resume" in err


# ---------------------------------------------------------------------------------------------------
# plot


@pytest.mark.parametrize("record, message", [
    ({"kind": "step", "epoch": 1, "loss": 1.0}, "a 'step' record has no numeric 'step'"),
    ({"kind": "epoch", "step": 3, "val_acc": 0.5}, "a 'epoch' record has no numeric 'epoch'"),
    ({"kind": "step", "step": 1, "epoch": 1, "loss": "high"}, "step 1 has loss = 'high', not a number"),
])
def test_plot_refuses_records_it_cannot_place_or_draw(capsys, tmp_path, record, message):
    good = {"kind": "step", "step": 2, "epoch": 1, "loss": 1.0}
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps(good) + "\n" + json.dumps(record) + "\n")
    assert message in one_line_error(capsys, ["plot", str(run)])
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]
