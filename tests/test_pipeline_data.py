"""Datasets: the embedded digits, few-sample subsets, image folders, torchvision errors, config files."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
import torch

from jacplug.errors import UnknownNameError, UserError
from jacplug.training.config import TrainConfig, read_config_file, resolve
from jacplug.data.datasets import few_sample_subset
from jacplug.registry import create_dataset
from image_tree import image_tree


def test_digits_splits_are_fixed_normalised_and_upsampled():
    a, b = create_dataset("digits"), create_dataset("digits", image_size=16)
    assert (len(a.train), len(a.val), len(a.test)) == (1258, 179, 360)
    assert a.input_shape == (1, 16, 16) and a.num_classes == 10 and not a.augment
    assert torch.equal(a.train[5][0], b.train[5][0])
    images = torch.stack([a.train[i][0] for i in range(len(a.train))])
    assert abs(float(images.mean())) < 1e-4 and abs(float(images.std()) - 1) < 1e-3
    assert create_dataset("digits", image_size=8).train[0][0].shape == (1, 8, 8)


def test_few_sample_subset_is_seeded_and_balanced():
    full = create_dataset("digits", image_size=8)
    one, again, other = (few_sample_subset(full, 3, seed) for seed in (0, 0, 1))
    assert len(one.train) == 30 and sorted(one.train_targets) == sorted(list(range(10)) * 3)
    assert one.train.indices == again.train.indices != other.train.indices
    assert len(full.train) == 1258  # the full splits are untouched (the teacher trains on them)
    smallest = min(sorted(set(full.train_targets)), key=full.train_targets.count)
    fewest = full.train_targets.count(smallest)
    assert len(few_sample_subset(full, fewest, 0).train) == 10 * fewest
    with pytest.raises(UserError, match=f"more than class {smallest} of 'digits' has \\({fewest} training images\\)"):
        few_sample_subset(full, fewest + 1, 0)  # silently keeping fewer would unbalance the classes


def test_imagefolder_reads_class_folders(tmp_path):
    from PIL import Image

    for cls in ("cat", "dog"):
        (tmp_path / cls).mkdir()
        for i in range(10):
            Image.new("RGB", (20, 20), (i * 20, 0, 0)).save(tmp_path / cls / f"{i}.png")
    splits = create_dataset(f"imagefolder:{tmp_path}", image_size=16)
    assert splits.num_classes == 2 and splits.input_shape == (3, 16, 16)
    assert len(splits.train) + len(splits.val) + len(splits.test) == 20
    assert splits.train[0][0].shape == (3, 16, 16)


@pytest.mark.parametrize("name, message", [("imagefolder:/no/such/dir", "'/no/such/dir' does not exist"),
                                           ("imagefolder:", "'imagefolder:' names no folder")])
def test_imagefolder_missing_path_is_a_user_error(name, message):
    with pytest.raises(UserError, match=message):
        create_dataset(name)


def test_unknown_dataset_suggests_close_names():
    with pytest.raises(UnknownNameError, match="cifar10"):
        create_dataset("cifar1O")


def test_cifar_offline_download_says_so(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UserError, match="offline.*--dataset digits"):
        create_dataset("cifar10", root=str(tmp_path), download=True)


def test_cifar_missing_without_download_suggests_download(tmp_path):
    with pytest.raises(UserError, match="--download"):
        create_dataset("cifar100", root=str(tmp_path))


def test_config_file_then_flags(tmp_path):
    yaml_file = tmp_path / "run.yaml"
    yaml_file.write_text("epochs: 7\nbatch-size: 16\nloss: [kd=1, 'jacobian=2:classes=label']\n")
    toml_file = tmp_path / "run.toml"
    toml_file.write_text('epochs = 7\nbatch_size = 16\nloss = ["kd=1"]\n')
    for path in (yaml_file, toml_file):
        options = read_config_file(path)
        config = resolve(options, {"epochs": 2, "lr": None})
        assert config.epochs == 2 and config.batch_size == 16 and config.lr == TrainConfig().lr
    assert read_config_file(yaml_file)["loss"] == ["kd=1", "jacobian=2:classes=label"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("epoch: 3\n", "unknown option 'epoch'; did you mean epochs"),
        ("epochs: three\n", "'epochs' must be an integer"),
        ("epochs: 0\n", "--epochs must be a positive integer"),
        ("epochs: [\n", "could not be parsed"),
    ],
)
def test_bad_config_files(tmp_path, text, message):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message):
        resolve(read_config_file(path), {})


def test_image_folder_splits_share_train_class_indices(tmp_path):
    root = image_tree(tmp_path, {"train": ["ant", "bee", "cat"], "val": ["ant", "bee", "cat"], "test": ["ant", "bee", "cat"]})
    splits = create_dataset(f"imagefolder:{root}", image_size=8)
    assert splits.num_classes == 3 and splits.val is not None
    for split in (splits.val, splits.test):
        assert split.class_to_idx == splits.train.class_to_idx
        assert sorted(set(split.targets)) == [0, 1, 2]


@pytest.mark.parametrize("split, classes, message", [
    ("val", ["ant", "cat"], r"image folder '.*val' lacks class\(es\) 'bee' that train/ has"),
    ("test", ["ant", "bee", "cat", "dog"], r"image folder '.*test' has class\(es\) 'dog' that train/ lacks"),
    ("test", ["bee", "cat", "dog"], r"lacks class\(es\) 'ant' that train/ has and has class\(es\) 'dog'"),
])
def test_image_folder_split_with_other_classes_is_a_one_line_error(tmp_path, split, classes, message):
    layout = {"train": ["ant", "bee", "cat"], "val": ["ant", "bee", "cat"], "test": ["ant", "bee", "cat"]}
    root = image_tree(tmp_path, {**layout, split: classes})
    with pytest.raises(UserError, match=message) as info:
        create_dataset(f"imagefolder:{root}", image_size=8)
    assert "\n" not in str(info.value)


def test_image_folder_with_train_and_val_only_has_no_validation_split(tmp_path):
    """val/ is the only held-out folder: it is the test split, and nothing pretends to validate on it."""
    root = image_tree(tmp_path, {"train": ["ant", "bee"], "val": ["ant", "bee"]})
    splits = create_dataset(f"imagefolder:{root}", image_size=8)
    assert splits.val is None and splits.test.root == str(tmp_path / "val")


def test_an_unreadable_image_is_dropped_from_its_own_split_with_a_warning_naming_it(tmp_path):
    """Never replaced by a neighbour (another class's or split's image): left out, named once, counted."""
    from jacplug.data.folders import UnreadableImageWarning

    root = image_tree(tmp_path / "images", {"train": ["a", "b"], "test": ["a", "b"]}, per_class=3)
    bad = root / "train" / "a" / "1.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated mid-file
    with pytest.warns(UnreadableImageWarning, match=r"image '.*train/a/1.png' cannot be read") as caught:
        splits = create_dataset(f"imagefolder:{root}", image_size=8, augment=False)
    assert len(caught) == 1 and splits.dropped_images == [str(bad)]
    assert len(splits.train) == 5 and len(splits.test) == 6
    assert splits.train.targets == [0, 0, 1, 1, 1] and str(bad) not in [p for p, _ in splits.train.samples]
    for path in (root / "test" / "a").iterdir():
        path.write_text("not an image")
    for path in (root / "test" / "b").iterdir():
        path.write_text("not an image")
    with pytest.warns(UnreadableImageWarning), pytest.raises(UserError, match=r"no readable image in '.*/test'"):
        create_dataset(f"imagefolder:{root}", image_size=8, augment=False)