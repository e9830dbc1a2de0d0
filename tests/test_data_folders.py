"""Image folders as timm lays them out, with every image kept in its own split and class: timm's split
names, class folders resolved to real paths, link loops that end, unreadable images dropped (never
replaced), and a --image-size refused before memory runs out (docs/pipeline.md, "Image folders")."""

from __future__ import annotations

import os
import sys
import threading
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from image_tree import image_tree  # noqa: E402

from jacplug.data.folders import UnreadableImageWarning  # noqa: E402
from jacplug.errors import UserError  # noqa: E402
from jacplug.registry import create_dataset  # noqa: E402


@pytest.mark.parametrize("names", [("training", "validation", "test"), ("train", "valid", "test"),
                                   ("train", "eval", None)])
def test_timms_split_folder_names_are_accepted(tmp_path, names):
    train, val, test = names
    image_tree(tmp_path, {name: ["a", "b"] for name in names if name})
    splits = create_dataset(f"imagefolder:{tmp_path}", image_size=8, augment=False)
    assert splits.train.root == str(tmp_path / train)
    if test:  # train/, a validation folder and test/: three splits
        assert splits.val.root == str(tmp_path / val) and splits.test.root == str(tmp_path / test)
    else:  # train/ and a validation folder only: that folder is the test split
        assert splits.val is None and splits.test.root == str(tmp_path / val)


def test_two_names_for_one_split_are_refused(tmp_path):
    image_tree(tmp_path, {"train": ["a", "b"], "val": ["a", "b"], "validation": ["a", "b"]})
    with pytest.raises(UserError, match="has val/ and validation/, two names for the val split; keep one"):
        create_dataset(f"imagefolder:{tmp_path}", image_size=8)


def test_a_class_folder_linked_to_another_is_refused(tmp_path):
    image_tree(tmp_path, {"train": ["a", "b"], "test": ["a", "b"]})
    os.symlink(tmp_path / "train" / "a", tmp_path / "train" / "c")
    with pytest.raises(UserError, match=r"class folders 'a' and 'c' are the same folder"):
        create_dataset(f"imagefolder:{tmp_path}", image_size=8)


def test_a_link_loop_inside_a_class_folder_ends(tmp_path):
    image_tree(tmp_path, {"train": ["a", "b"], "test": ["a", "b"]}, per_class=2)
    os.symlink(tmp_path / "train" / "a", tmp_path / "train" / "a" / "again")  # a/again/again/... forever
    result = {}
    worker = threading.Thread(target=lambda: result.update(
        splits=create_dataset(f"imagefolder:{tmp_path}", image_size=8, augment=False)), daemon=True)
    worker.start()
    worker.join(timeout=60)
    assert not worker.is_alive(), "reading a folder with a link loop did not end"
    assert len(result["splits"].train) == 4  # each real image once


def test_a_folder_whose_images_are_all_unreadable_says_so(tmp_path):
    root = image_tree(tmp_path, {"all": ["a", "b"]}, per_class=10) / "all"
    for path in root.rglob("*.png"):
        path.write_bytes(b"not an image")
    with pytest.warns(UnreadableImageWarning), pytest.raises(UserError, match=r"no readable image in '.*/all'"):
        create_dataset(f"imagefolder:{root}", image_size=8)


def test_an_unreadable_image_of_a_flat_folder_leaves_the_other_splits_as_they_were(tmp_path):
    """The 80/10/10 split is drawn over every file, then the unreadable one leaves its own split only."""
    root = image_tree(tmp_path, {"all": ["a", "b"]}, per_class=10) / "all"
    before = create_dataset(f"imagefolder:{root}", image_size=8, augment=False)
    victim = before.val.samples[0][0]
    Path(victim).write_bytes(b"not an image")
    with pytest.warns(UnreadableImageWarning, match="it is dropped from its split"):
        after = create_dataset(f"imagefolder:{root}", image_size=8, augment=False)
    assert after.val.samples == before.val.samples[1:] and after.dropped_images == [victim]
    assert after.train.samples == before.train.samples and after.test.samples == before.test.samples


def test_a_huge_image_size_is_refused_before_memory_runs_out(tmp_path, capsys, monkeypatch):
    """The activations are counted for real (meta device); the free memory is fixed at 4 GB, so the test
    does not depend on the machine (and never starts a 4096 px run on a large one)."""
    from jacplug.cli.main import main
    from jacplug.models import memory

    monkeypatch.setattr(memory, "available_bytes", lambda device: 4 * 10**9)
    image_tree(tmp_path / "images", {"train": ["a", "b"], "test": ["a", "b"]})
    rc = main(["train", "--dataset", f"imagefolder:{tmp_path / 'images'}", "--teacher", "test_resnet", "--student",
               "test_resnet", "--image-size", "4096", "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and len(err.strip().splitlines()) == 1
    assert "--image-size 4096: one training step of 6 images keeps at least 21.3 GB of activations in the student " \
           "'test_resnet', more than the 4.0 GB free on cpu; pass --image-size 1776 or less" in err
    assert not (tmp_path / "run" / "config.json").exists()
