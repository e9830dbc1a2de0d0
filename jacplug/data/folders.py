"""Image folders read the way timm and torchvision read them (one sub-folder of images per class), with
every image kept in its own split and class.

- Split folders: ``train/`` (or timm's synonym ``training/``) plus ``test/`` and a validation folder
  named as timm's ``train.py`` accepts it (``val/``, ``valid/``, ``validation/``, ``eval/``,
  ``evaluation/``). Two names for the same split are refused (which one holds the validation images?).
- Class folders are resolved to their real paths: two class folders that are the same folder (one a
  link to the other) are refused, since the same images would carry two labels; links inside a class
  folder are followed, each real folder once, so a link loop ends.
- Unreadable images are found before the run starts by decoding every image (``PIL.Image.load``:
  ``verify()`` reads headers only and passes a truncated JPEG). An unreadable image is dropped from its
  own split (never replaced by a neighbour, which would serve another class's or split's image), named
  in one :class:`UnreadableImageWarning`, and listed in the splits' ``dropped_images``. Decoding runs in
  threads (PIL releases the GIL); docs/pipeline.md gives the measured cost.
"""

from __future__ import annotations

import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from PIL import Image
from torch.utils.data import Dataset

from ..errors import UserError

#: the image files a folder is read for (torchvision's ``IMG_EXTENSIONS``)
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
#: folder names of each split, as timm's ``create_dataset`` searches them
SPLIT_NAMES = {"train": ("train", "training"), "val": ("val", "valid", "validation", "eval", "evaluation"),
               "test": ("test",)}


class UnreadableImageWarning(UserWarning):
    """An image of an image folder could not be read; it was dropped from its split."""


def unreadable_image_errors() -> tuple[type[BaseException], ...]:
    """What PIL raises for a file that cannot be an image: truncated (``OSError``), not an image
    (``UnidentifiedImageError``, a ``SyntaxError`` in old PIL), or a header that claims more pixels than
    PIL's decompression-bomb limit (``DecompressionBombError``, a plain ``Exception``)."""
    return OSError, SyntaxError, Image.DecompressionBombError


def split_folders(path: Path) -> dict[str, Path]:
    """``{"train": ..., "val": ..., "test": ...}``: the split folders present under ``path`` (timm's names)."""
    found: dict[str, Path] = {}
    for split, names in SPLIT_NAMES.items():
        present = [path / name for name in names if (path / name).is_dir()]
        if len(present) > 1:
            raise UserError(f"image folder {str(path)!r} has {' and '.join(p.name + '/' for p in present)}, two "
                            f"names for the {split} split; keep one")
        if present:
            found[split] = present[0]
    return found


def class_folders(path: Path) -> list[tuple[str, Path]]:
    """``(class name, real folder)`` per sub-folder of ``path``, sorted by name (torchvision's numbering);
    two names for one real folder are a one-line refusal."""
    try:
        entries = sorted((e.name, Path(e.path)) for e in os.scandir(path) if e.is_dir() and not e.name.startswith("."))
    except OSError as exc:
        raise UserError(f"image folder {str(path)!r} cannot be listed ({exc.strerror or exc})") from exc
    seen: dict[Path, str] = {}
    classes = []
    for name, folder in entries:
        real = folder.resolve()
        if real in seen:
            raise UserError(f"image folder {str(path)!r}: class folders {seen[real]!r} and {name!r} are the same "
                            f"folder ({real}), so its images would carry two labels; remove the link")
        seen[real] = name
        classes.append((name, real))
    return classes


def image_files(folder: Path) -> list[Path]:
    """Image files under ``folder`` and its sub-folders, sorted; links are followed, each real folder once."""
    files, visited = [], set()
    for root, dirs, names in os.walk(folder, followlinks=True):
        real = Path(root).resolve()
        if real in visited:  # a link back up (a loop) or a second way to the same folder
            dirs[:] = []
            continue
        visited.add(real)
        dirs.sort()
        files.extend(Path(root) / n for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS))
    return files


def _decode_error(path: Path) -> str | None:
    """Why ``path`` cannot be decoded, or ``None`` when it can."""
    try:
        with Image.open(path) as image:
            image.load()
    except unreadable_image_errors() as exc:
        return " ".join(str(exc).split()) or type(exc).__name__
    return None


def unreadable(paths: Sequence[Path]) -> dict[Path, str]:
    """``{path: reason}`` for the images among ``paths`` that do not decode (all decoded, in threads)."""
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        reasons = list(pool.map(_decode_error, paths, chunksize=16))
    return {p: r for p, r in zip(paths, reasons) if r is not None}


@dataclass
class FolderImages(Dataset):
    """One split of an image folder: ``samples`` (path, class index) in class then file order, decoded
    lazily, converted to RGB and passed through ``transform``. ``dropped``: the unreadable files left out."""

    root: str
    classes: list[str]
    samples: list[tuple[str, int]]
    transform: Callable | None = None
    dropped: list[str] = field(default_factory=list)

    @property
    def targets(self) -> list[int]:
        return [label for _, label in self.samples]

    @property
    def class_to_idx(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.classes)}

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int):
        path, label = self.samples[index]
        try:
            with Image.open(path) as opened:
                image = opened.convert("RGB")
        except unreadable_image_errors() as exc:  # changed on disk after the start-of-run check
            raise UserError(f"image {path!r} cannot be read any more ({' '.join(str(exc).split())}); it decoded "
                            "when the run started: restore or remove it and run again (--resume continues)") from exc
        return (self.transform(image) if self.transform is not None else image), label

    def with_transform(self, transform: Callable) -> "FolderImages":
        """The same images through another transform (a split's training and evaluation views)."""
        return FolderImages(self.root, self.classes, self.samples, transform, self.dropped)


def read_split(path: Path, classes: Sequence[str] | None = None) -> FolderImages:
    """The split under ``path``: its class folders (exactly ``classes`` when given, numbered in that
    order) and every image file in them, nothing decoded yet (:func:`drop_unreadable` checks them)."""
    found = class_folders(path)
    names = [name for name, _ in found]
    if classes is not None:
        missing, extra = sorted(set(classes) - set(names)), sorted(set(names) - set(classes))
        if missing or extra:  # each split numbers its classes alike only with the same class names
            problems = ([f"lacks class(es) {', '.join(map(repr, missing))} that train/ has"] if missing else []) + (
                [f"has class(es) {', '.join(map(repr, extra))} that train/ lacks"] if extra else [])
            raise UserError(f"image folder {str(path)!r} {' and '.join(problems)}; every split needs the same "
                            "class sub-folders")
    order = list(classes) if classes is not None else names
    folders = dict(found)
    samples = [(str(file), order.index(name)) for name in order for file in image_files(folders[name])]
    if not samples:
        raise UserError(f"image folder {str(path)!r} holds no image ({', '.join(IMAGE_EXTENSIONS)}) in its class "
                        "sub-folders")
    return FolderImages(str(path), order, samples)


def drop_unreadable(images: FolderImages, parts: dict[str, list[int]]) -> tuple[FolderImages, ...]:
    """One :class:`FolderImages` per part of ``images`` (``{name: indices}``) without the images that do
    not decode, each named in one :class:`UnreadableImageWarning` and listed in ``dropped``. A part
    left without an image is a one-line refusal naming the folder (and the part, when there are several)."""
    bad = unreadable([Path(p) for p, _ in images.samples])
    for file, reason in bad.items():
        warnings.warn(f"image {str(file)!r} cannot be read ({reason}); it is dropped from its split: replace or "
                      "remove the file", UnreadableImageWarning, stacklevel=3)
    if len(bad) == len(images.samples):
        raise UserError(f"no readable image in {images.root!r}: all {len(bad)} fail to decode; replace them")
    result = []
    for name, indices in parts.items():
        kept = [images.samples[i] for i in indices if Path(images.samples[i][0]) not in bad]
        if not kept:
            raise UserError(f"no readable image in the {name} split of {images.root!r}: its {len(indices)} fail to "
                            "decode; replace them")
        dropped = sorted(images.samples[i][0] for i in indices if Path(images.samples[i][0]) in bad)
        result.append(FolderImages(images.root, images.classes, kept, images.transform, dropped))
    return tuple(result)
