"""Preprocessing from the student's own timm data configuration: the statistics, resize filter and crop a
pretrained configuration declares reach the tensors, augmentation options reach the training transform,
and a checkpoint records exactly what was applied (docs/pipeline.md, "Preprocessing")."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from image_tree import image_tree  # noqa: E402

from jacplug.errors import UserError  # noqa: E402
from jacplug.training.config import resolve  # noqa: E402
from jacplug.training.prepare import load_data  # noqa: E402


def config(folder: Path, **options):
    return resolve({}, {"dataset": f"imagefolder:{folder}", "teacher": "test_resnet", "student": "test_resnet",
                        "image_size": 16, **options})


def colour_of(path: str) -> tuple[int, int, int]:
    from PIL import Image

    with Image.open(path) as image:
        return image.convert("RGB").getpixel((0, 0))


@pytest.fixture
def folder(tmp_path):
    return image_tree(tmp_path / "images", {"train": ["a", "b"], "val": ["a", "b"]}, per_class=2, size=20)


@pytest.mark.parametrize("student, mean, std", [
    ("vit_tiny_patch16_224.augreg_in21k", (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    ("resnet50.a1_in1k", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
])
def test_the_statistics_a_pretrained_config_declares_reach_the_tensors(folder, student, mean, std):
    splits = load_data(config(folder, student=student, augment=False))
    image, _ = splits.test[0]  # a constant colour: every pixel is (c / 255 - mean) / std
    colour = torch.tensor(colour_of(splits.test.samples[0][0]))
    expected = (colour / 255 - torch.tensor(mean)) / torch.tensor(std)
    torch.testing.assert_close(image.mean((1, 2)), expected, atol=1e-5, rtol=0)
    assert splits.mean == mean and splits.std == std


def test_the_declared_crop_and_filter_reach_the_tensors_and_the_flags_override_them(tmp_path):
    """A 20 px image with a 2 px black frame: resized to 16 px uncropped the frame stays; resnet50.a1_in1k's
    crop of 0.95 leaves less of it; --crop-pct 0.75 cuts it away."""
    from PIL import Image

    root = tmp_path / "framed"
    for split in ("train", "val"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            image = Image.new("RGB", (20, 20), (0, 0, 0))
            image.paste((255, 255, 255), (2, 2, 18, 18))
            for i in range(2):
                image.save(root / split / cls / f"{i}.png")

    def frame(splits) -> float:  # how dark the outermost ring of pixels is (0: white, 1: black)
        image = splits.test[0][0] * torch.tensor(splits.std).view(3, 1, 1) + torch.tensor(splits.mean).view(3, 1, 1)
        ring = torch.cat([image[:, 0], image[:, -1], image[:, :, 0], image[:, :, -1]], dim=1)
        return float(1 - ring.mean())

    declared = load_data(config(root, student="resnet50.a1_in1k", augment=False))
    assert (declared.interpolation, declared.crop_pct) == ("bicubic", 0.95)
    uncropped = load_data(config(root, student="resnet50.a1_in1k", augment=False, crop_pct=1.0,
                                 interpolation="bilinear"))
    cropped = load_data(config(root, student="resnet50.a1_in1k", augment=False, crop_pct=0.75))
    assert (uncropped.interpolation, uncropped.crop_pct, cropped.crop_pct) == ("bilinear", 1.0, 0.75)
    assert frame(uncropped) > 0.5 and frame(cropped) < 0.1  # bicubic rings a little


def test_augmentation_options_reach_the_training_transform_only(folder):
    splits = load_data(config(folder, aa="rand-m9-mstd0.5", reprob=0.5, scale=[0.5, 1.0], ratio=[0.9, 1.1]))
    train = [type(t).__name__ for t in splits.train.transform.transforms]
    evaluate = [type(t).__name__ for t in splits.test.transform.transforms]
    assert {"RandomResizedCropAndInterpolation", "RandAugment", "RandomErasing"} <= set(train)
    assert not {"RandAugment", "RandomErasing"} & set(evaluate)
    crop = splits.train.transform.transforms[0]
    assert crop.scale == (0.5, 1.0) and crop.ratio == (0.9, 1.1)
    assert splits.train[0][0].shape == (3, 16, 16)


@pytest.mark.parametrize("options, message", [
    ({"augment": False, "aa": "rand-m9"}, "--aa augment training images, but --no-augment"),
    ({"crop_pct": 1.5}, "--crop-pct must be a fraction in"),
    ({"scale": [1.0, 0.5]}, "--scale takes two numbers LO HI"),
    ({"dataset": "digits", "reprob": 0.25}, "the embedded digits keep their own tensors"),
    ({"aa": "foo"}, "--aa 'foo' is not an augmentation timm knows \\(Unknown AA policy foo\\)"),
])
def test_preprocessing_options_no_run_could_use_are_one_line_refusals(folder, options, message):
    with pytest.raises(UserError, match=message) as info:
        load_data(config(folder, **options))
    assert "\n" not in str(info.value)


def test_a_checkpoint_records_the_preprocessing_that_was_applied(tmp_path, capsys):
    """timm's own resolve_data_config on jacplug.load_model gives the run's tensors back; an unreadable
    image is named once and listed in the summary and config.json."""
    from timm.data import create_transform, resolve_data_config

    import jacplug
    from jacplug.cli.main import main
    from jacplug.data.folders import UnreadableImageWarning

    folder = image_tree(tmp_path / "images", {"train": ["a", "b"], "val": ["a", "b"]}, per_class=3, size=20)
    bad = folder / "train" / "a" / "2.png"
    bad.write_bytes(b"not an image")
    run = tmp_path / "run"
    with pytest.warns(UnreadableImageWarning, match=f"image '{re.escape(str(bad))}' cannot be read") as caught:
        rc = main(["train", "--dataset", f"imagefolder:{folder}", "--teacher", "test_resnet", "--student", "test_resnet",
                   "--image-size", "16", "--crop-pct", "0.8", "--interpolation", "bicubic", "--no-augment",
                   "--teacher-steps", "1", "--steps", "1", "--batch-size", "4", "--agreement-images", "0", "--loss",
                   "kd=1", "--no-check-gradients", "--log-off", "plot", "--out", str(run), "--json"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert len([w for w in caught if w.category is UnreadableImageWarning]) == 1  # named once, not per epoch
    assert json.loads(out)["dropped_images"] == [str(bad)]
    assert json.loads((run / "config.json").read_text())["dropped_images"] == [str(bad)]
    with pytest.warns(UnreadableImageWarning):
        splits = load_data(config(folder, crop_pct=0.8, interpolation="bicubic", augment=False))
    recorded = resolve_data_config(model=jacplug.load_model(run / "student_best.safetensors"))
    assert recorded == splits.data_config
    assert recorded["mean"] == (0.5, 0.5, 0.5) and recorded["crop_pct"] == 0.8  # test_resnet declares 0.5/0.5
    from PIL import Image

    with Image.open(splits.test.samples[0][0]) as image:
        torch.testing.assert_close(create_transform(**recorded)(image.convert("RGB")), splits.test[0][0])


def test_a_teacher_checkpoint_of_other_statistics_sees_them(tmp_path):
    """The Distiller's teacher_input maps the run's tensors to the normalisation the checkpoint records."""
    import timm

    from jacplug.io.checkpoint import save_model
    from jacplug.models.pretrained import teacher_view

    path = tmp_path / "teacher.safetensors"
    save_model(path, timm.create_model("test_resnet", num_classes=2), role="teacher", name="test_resnet",
               num_classes=2, input_shape=(3, 8, 8), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), config={})
    imagenet = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    view = teacher_view(str(path), *imagenet)
    pixels = torch.rand(2, 3, 4, 4)
    as_run = (pixels - torch.tensor(imagenet[0]).view(1, 3, 1, 1)) / torch.tensor(imagenet[1]).view(1, 3, 1, 1)
    torch.testing.assert_close(view(as_run), (pixels - 0.5) / 0.5)
    assert teacher_view(str(path), (0.5,) * 3, (0.5,) * 3) is None and teacher_view(None, *imagenet) is None
