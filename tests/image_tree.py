"""Tiny generated image-folder trees (a few PNGs per class) for dataset and CLI tests."""

from __future__ import annotations

from pathlib import Path


def image_tree(root: Path, splits: dict[str, list[str]], per_class: int = 3, size: int = 10) -> Path:
    """Write ``root/SPLIT/CLASS/i.png`` for every split and class; each class has its own colour, so
    a model can learn them and a shifted label is visible. Returns ``root``."""
    from PIL import Image

    colours = {}
    for split, classes in splits.items():
        for cls in classes:
            colour = colours.setdefault(cls, (40 * len(colours) % 256, 255 - 60 * len(colours) % 256, 90))
            (root / split / cls).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                Image.new("RGB", (size, size), tuple(min(255, c + 5 * i) for c in colour)).save(root / split / cls / f"{i}.png")
    return root
