"""Datasets for the pipeline: what a dataset plugin returns, the built-in datasets, few-sample subsets.

A dataset factory (registered through ``register_datasets``) returns :class:`DatasetSplits`. Every
split yields ``(image [C, H, W] float32, label int)``; images are already normalised with
``mean``/``std`` (per channel) after resizing with ``interpolation`` and a centre crop of ``crop_pct``,
which the checkpoint metadata records (timm's ``pretrained_cfg``) so a user can reproduce the
preprocessing with timm or plain torch. CIFAR and image folders take them from the student's timm
data configuration (:mod:`.preprocess`). The pipeline wraps splits in :class:`Indexed` so each batch also
carries the sample's position in its split, which the teacher cache uses as its key.

Built-ins:

- ``digits`` (embedded, no download): the UCI optical-recognition handwritten digits as shipped by
  scikit-learn (1,797 8x8 images, 16 grey levels; CC BY 4.0, Alpaydin & Kaynak, UCI ML repository),
  upsampled bilinearly to ``image_size`` (default 16x16, one channel: timm's ResNet stem reduces
  16x16 to 4x4, cheap enough for a CPU demo, and the size the default loss weights were measured at,
  see :func:`jacplug.losses.jacobian_distillation`). The split is
  stratified and fixed (seed 0, independent of ``--seed``): 1,258 train / 179 val / 360 test.
- ``cifar10`` / ``cifar100`` through torchvision (``root``, ``download``); 5,000 training images
  (fixed, seed 0) form the validation split, the official test set is the test split.
- ``imagefolder:PATH``: class sub-folders under ``PATH/train`` and ``PATH/test`` (plus ``PATH/val``,
  or another of timm's names for it such as ``validation``, for choosing the best epoch), or directly
  under ``PATH`` (then split 80/10/10, stratified, seed 0). Every split must have exactly train's
  classes. With ``train`` and a validation folder only, that folder is the test split and there is no
  validation split (the best epoch is then chosen on it, and the summary says so). Unreadable images
  are dropped from their own split (:mod:`.folders`).
"""

from __future__ import annotations

import dataclasses
import gzip
import urllib.error
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset, Subset

from ..errors import UserError
from .folders import SPLIT_NAMES, drop_unreadable, read_split, split_folders
from .preprocess import Preprocessing

SPLIT_SEED = 0  # data splits never depend on --seed, so accuracies of different seeds are comparable


@dataclass
class DatasetSplits:
    """Train/val/test splits plus what a checkpoint needs to reproduce the preprocessing.

    ``input_shape``: ``(C, H, W)`` of one image. ``mean``/``std``: per-channel normalisation already
    applied to the images. ``augment``: whether the train split applies random augmentation (the
    teacher cache requires it off: a cached teacher output would not match an augmented input).
    ``val`` may be ``None``; then the best checkpoint is chosen on the test split, and the summary says so.
    """

    name: str
    train: Dataset
    val: Dataset | None
    test: Dataset
    num_classes: int
    input_shape: tuple[int, int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: bool
    train_targets: Sequence[int] | None = None  # labels of ``train`` in order, to subset without loading images
    #: how images were resized and cropped (timm's data keys; the digits are upsampled bilinearly, uncropped)
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "center"
    #: unreadable image files left out of their split (image folders; see :mod:`.folders`)
    dropped_images: list[str] = dataclasses.field(default_factory=list)

    @property
    def in_chans(self) -> int:
        return self.input_shape[0]

    @property
    def data_config(self) -> dict:
        """What ``timm.data.resolve_data_config`` returns for a model trained on these splits."""
        return {"input_size": tuple(self.input_shape), "interpolation": self.interpolation, "mean": tuple(self.mean),
                "std": tuple(self.std), "crop_pct": self.crop_pct, "crop_mode": self.crop_mode}


class Indexed(Dataset):
    """Yields ``(image, label, index)``: the index is the sample's position in the wrapped dataset,
    the key of the teacher cache."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        image, label = self.dataset[index]
        return image, int(label), index


# ---------------------------------------------------------------------------------------------------
# splitting and subsets


def labels_of(dataset: Dataset, known: Sequence[int] | None = None) -> list[int]:
    """Labels in dataset order: ``known`` or ``dataset.targets`` when available, else by iterating."""
    if known is not None:
        return [int(t) for t in known]
    targets = getattr(dataset, "targets", None)
    if targets is not None:
        return [int(t) for t in targets]
    return [int(dataset[i][1]) for i in range(len(dataset))]


def stratified_split(labels: Sequence[int], fractions: Sequence[float], seed: int = SPLIT_SEED) -> list[list[int]]:
    """Split indices per class by ``fractions`` (the last part takes the rest), shuffled with ``seed``.

    Returns one sorted index list per fraction.
    """
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(int(y), []).append(i)
    generator = torch.Generator().manual_seed(seed)
    parts: list[list[int]] = [[] for _ in fractions]
    for y in sorted(by_class):
        idx = by_class[y]
        order = [idx[j] for j in torch.randperm(len(idx), generator=generator).tolist()]
        start = 0
        for k, frac in enumerate(fractions):
            stop = len(order) if k == len(fractions) - 1 else start + round(frac * len(order))
            parts[k].extend(order[start:stop])
            start = stop
    return [sorted(p) for p in parts]


def few_sample_subset(splits: DatasetSplits, samples_per_class: int, seed: int) -> DatasetSplits:
    """Keep ``samples_per_class`` training images of each class, chosen by ``seed`` (deterministic).

    Returns new splits (the given ones are unchanged, so the teacher can still train on all of
    them). The val/test splits are the same. Asking for more images than a class has is an error
    naming that class: silently keeping fewer would make "N per class" untrue and the classes unbalanced.
    """
    if samples_per_class <= 0:
        raise UserError(f"--samples-per-class must be a positive integer, got {samples_per_class}")
    labels = labels_of(splits.train, splits.train_targets)
    by_class: dict[int, list[int]] = {}
    for i, y in enumerate(labels):
        by_class.setdefault(y, []).append(i)
    smallest = min(by_class, key=lambda y: (len(by_class[y]), y))
    if samples_per_class > len(by_class[smallest]):
        raise UserError(
            f"--samples-per-class {samples_per_class} is more than class {smallest} of {splits.name!r} has "
            f"({len(by_class[smallest])} training images); pass at most {len(by_class[smallest])}, or leave "
            "--samples-per-class out to train on every image"
        )
    generator = torch.Generator().manual_seed(seed)
    keep: list[int] = []
    for y in sorted(by_class):
        idx = by_class[y]
        perm = torch.randperm(len(idx), generator=generator).tolist()[:samples_per_class]
        keep.extend(idx[j] for j in perm)
    keep.sort()
    return dataclasses.replace(splits, train=Subset(splits.train, keep), train_targets=[labels[i] for i in keep])


# ---------------------------------------------------------------------------------------------------
# embedded digits


def _read_digits() -> tuple[Tensor, Tensor]:
    """``images [1797, 1, 8, 8]`` in [0, 1] and ``labels [1797]`` from the embedded CSV."""
    raw = resources.files("jacplug").joinpath("data/digits.csv.gz").read_bytes()
    rows = [line.split(",") for line in gzip.decompress(raw).decode().split()]
    values = torch.tensor([[int(v) for v in row] for row in rows], dtype=torch.float32)
    return values[:, :64].reshape(-1, 1, 8, 8) / 16.0, values[:, 64].long()


class TensorImages(Dataset):
    """Images held in memory ``[N, C, H, W]`` with labels ``[N]``, optionally augmented by a random
    shift (zero-padded crop by up to ``shift`` pixels; no flip: a mirrored digit is another glyph)."""

    def __init__(self, images: Tensor, labels: Tensor, shift: int = 0) -> None:
        self.images, self.labels, self.shift = images, labels, shift
        self.targets = labels.tolist()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int):
        image = self.images[index]
        if self.shift:
            h, w = image.shape[-2:]
            padded = torch.nn.functional.pad(image, (self.shift,) * 4)
            dy, dx = torch.randint(0, 2 * self.shift + 1, (2,)).tolist()
            image = padded[:, dy : dy + h, dx : dx + w]
        return image, self.targets[index]


#: the largest size the embedded digits are upsampled to: 1,797 images of 512 x 512 floats are 1.9 GB
DIGITS_MAX_SIZE = 512


def digits(*, image_size: int | None = None, augment: bool | None = None, **_: object) -> DatasetSplits:
    """The embedded handwritten digits, upsampled to ``image_size`` (default 16), normalised with the
    train split's mean/std. ``augment`` (default off) shifts training images by up to 2 pixels."""
    size = image_size or 16
    if size < 8:
        raise UserError(f"--image-size for digits must be at least 8 (the source is 8x8), got {size}")
    if size > DIGITS_MAX_SIZE:
        gigabytes = 1797 * size * size * 4 / 1e9
        raise UserError(f"--image-size {size} would upsample the 8x8 digits to {gigabytes:,.1f} GB of float32 "
                        f"images; use at most {DIGITS_MAX_SIZE}")
    images, labels = _read_digits()
    if size != 8:
        images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    train_idx, val_idx, test_idx = stratified_split(labels.tolist(), (0.7, 0.1, 0.2))
    mean, std = float(images[train_idx].mean()), float(images[train_idx].std())
    images = (images - mean) / std
    augment = bool(augment)

    def part(idx: list[int], shift: int = 0) -> TensorImages:
        return TensorImages(images[idx].contiguous(), labels[idx].contiguous(), shift)

    train = part(train_idx, shift=2 if augment else 0)
    return DatasetSplits(
        name="digits",
        train=train,
        val=part(val_idx),
        test=part(test_idx),
        num_classes=10,
        input_shape=(1, size, size),
        mean=(mean,),
        std=(std,),
        augment=augment,
        train_targets=train.targets,
    )


# ---------------------------------------------------------------------------------------------------
# torchvision datasets

_CIFAR_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}


def cifar(
    name: str,
    *,
    root: str | None = None,
    download: bool = False,
    image_size: int | None = None,
    augment: bool | None = None,
    preprocessing: Preprocessing | None = None,
    **_: object,
) -> DatasetSplits:
    """CIFAR-10/100 from torchvision under ``root`` (downloaded there with ``download=True``).

    ``preprocessing``: the student's timm data configuration (CIFAR's own statistics where it declares
    none); training augmentation (timm's random resized crop and flip, plus its options) is on unless
    ``augment=False``.
    """
    from torchvision import datasets

    root = root or "data"
    cls = datasets.CIFAR10 if name == "cifar10" else datasets.CIFAR100
    augment = True if augment is None else bool(augment)
    size = image_size or 32
    preprocessing = (preprocessing or Preprocessing()).filled(*_CIFAR_STATS[name])
    train_tf, eval_tf = preprocessing.transforms(size, augment)
    try:
        train_full = cls(root, train=True, download=download, transform=train_tf)
        train_plain = cls(root, train=True, download=False, transform=eval_tf)
        test = cls(root, train=False, download=download, transform=eval_tf)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted"
        raise UserError(
            f"{name} not found under --data-root {root!r}; pass --download to fetch it (needs internet), "
            "or use the embedded dataset: --dataset digits"
        ) from exc
    except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
        raise UserError(
            f"could not download {name} ({type(exc).__name__}: {exc}); this machine seems offline: copy the "
            f"dataset into --data-root {root!r}, or use the embedded dataset: --dataset digits"
        ) from exc
    train_idx, val_idx = stratified_split(train_full.targets, (0.9, 0.1))
    return DatasetSplits(
        name=name,
        train=Subset(train_full, train_idx),
        val=Subset(train_plain, val_idx),
        test=test,
        num_classes=len(train_full.classes),
        input_shape=(3, size, size),
        mean=preprocessing.mean,
        std=preprocessing.std,
        augment=augment,
        train_targets=[train_full.targets[i] for i in train_idx],
        interpolation=preprocessing.interpolation,
        crop_pct=preprocessing.crop_pct,
        crop_mode=preprocessing.crop_mode,
    )


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


#: the stratified train/validation/test split of an image folder without train/, val/ and test/
FOLDER_FRACTIONS = (0.8, 0.1, 0.1)


def _check_classes(path: Path, classes: Sequence[str]) -> None:
    """A classifier needs two classes: with one, every prediction is right and accuracy says nothing."""
    if len(classes) < 2:
        raise UserError(f"image folder {str(path)!r} has {len(classes)} class sub-folder ({', '.join(map(repr, classes))}); "
                        "a classifier needs at least two classes, one sub-folder of images each")


def fewest_per_class(fractions: Sequence[float]) -> int:
    """The fewest images per class for which :func:`stratified_split` puts at least one in every part."""
    n = len(fractions)
    while min(len(part) for part in stratified_split([0] * n, fractions)) == 0:
        n += 1
    return n


def _check_not_empty(path: Path, folder, parts: dict[str, list[int]]) -> None:
    """An empty split would report 0 % from zero images, and choose the best checkpoint on nothing."""
    empty = [name for name, indices in parts.items() if not indices]
    if empty:
        counts = {name: folder.targets.count(i) for i, name in enumerate(folder.classes)}
        smallest = min(counts, key=counts.get)
        raise UserError(
            f"image folder {str(path)!r} is too small to split 80/10/10: the {' and '.join(empty)} split(s) would be "
            f"empty (class {smallest!r} has {counts[smallest]} image(s)); give each class at least "
            f"{fewest_per_class(FOLDER_FRACTIONS)} images, or split them yourself into train/, val/ and test/")


def imagefolder(name: str, *, image_size: int | None = None, augment: bool | None = None,
                preprocessing: Preprocessing | None = None, **_: object) -> DatasetSplits:
    """``imagefolder:PATH``: class sub-folders (:mod:`.folders`), resized and centre-cropped to
    ``image_size`` (default 64) with ``preprocessing`` (the student's timm data configuration; ImageNet
    statistics where it declares none), augmentation on unless ``augment=False``.

    Splits come from ``PATH/train`` and ``PATH/test`` plus a validation folder (timm's names, see
    :data:`.folders.SPLIT_NAMES`; each with train's classes; see the module docstring for a missing
    one), or from a stratified 80/10/10 split of ``PATH``. Unreadable images are dropped from their
    split and listed in ``dropped_images``."""
    raw = name.split(":", 1)[1]
    if not raw.strip():
        raise UserError(f"--dataset {name!r} names no folder; pass --dataset imagefolder:PATH with class sub-folders "
                        "under PATH (or PATH/train, PATH/val, PATH/test)")
    path = Path(raw).expanduser()
    if not path.is_dir():
        raise UserError(f"image folder {str(path)!r} does not exist or is not a directory; expected class "
                        "sub-folders under PATH (or PATH/train, PATH/val, PATH/test)")
    size = image_size or 64
    augment = True if augment is None else bool(augment)
    preprocessing = (preprocessing or Preprocessing()).filled(IMAGENET_MEAN, IMAGENET_STD)
    train_tf, eval_tf = preprocessing.transforms(size, augment)

    found = split_folders(path)
    if "train" in found:
        train = read_split(found["train"])
        _check_classes(found["train"], train.classes)
        if "test" not in found and "val" not in found:
            names = "/, ".join(SPLIT_NAMES["val"])
            raise UserError(f"image folder {str(path)!r} has {found['train'].name}/ but neither test/ nor a validation "
                            f"folder ({names}/) to evaluate on")
        # with train/ and a validation folder only, that folder is the test split and there is no validation
        # split: the best epoch is then chosen on the test split, which the summary says
        val_dir = found["val"] if "test" in found and "val" in found else None
        test_dir = found.get("test", found.get("val"))
        (train,) = drop_unreadable(train, {"train": list(range(len(train)))})
        held_out = []
        for folder in (val_dir, test_dir):
            split = read_split(folder, train.classes) if folder else None
            held_out.append(drop_unreadable(split, {"": list(range(len(split)))})[0] if split else None)
        val, test = held_out
        train, val, test = train.with_transform(train_tf), val and val.with_transform(eval_tf), test.with_transform(eval_tf)
        dropped = [*train.dropped, *(val.dropped if val else []), *test.dropped]
    else:
        full = read_split(path)
        _check_classes(path, full.classes)
        parts = dict(zip(("train", "validation", "test"), stratified_split(full.targets, FOLDER_FRACTIONS)))
        _check_not_empty(path, full, parts)
        train, val, test = drop_unreadable(full, parts)
        dropped = [*train.dropped, *val.dropped, *test.dropped]
        train, val, test = train.with_transform(train_tf), val.with_transform(eval_tf), test.with_transform(eval_tf)
    return DatasetSplits(
        name=name,
        train=train,
        val=val,
        test=test,
        num_classes=len(train.classes),
        input_shape=(3, size, size),
        mean=preprocessing.mean,
        std=preprocessing.std,
        augment=augment,
        train_targets=train.targets,
        interpolation=preprocessing.interpolation,
        crop_pct=preprocessing.crop_pct,
        crop_mode=preprocessing.crop_mode,
        dropped_images=dropped,
    )
