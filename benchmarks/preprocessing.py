"""What reaches the tensors of an image folder for students with different timm pretrained configurations,
measured from the tensors (mean and std solved from two constant-colour images, size from the shape,
resize and crop from the evaluation transform), and what the start-of-run scan for unreadable images
costs on a few hundred small images. No download: the models are only read for their configurations.

    python benchmarks/preprocessing.py [--images 300]

docs/pipeline.md quotes both.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from jacplug.data.folders import image_files, unreadable
from jacplug.training.config import resolve
from jacplug.training.prepare import load_data

STUDENTS = ("resnet50.a1_in1k", "vit_tiny_patch16_224.augreg_in21k", "convnext_tiny.fb_in1k")
COLOURS = {"a": (200, 100, 50), "b": (20, 180, 240)}


def reaching_tensors(root: Path) -> None:
    for split in ("train", "val"):
        for name, colour in COLOURS.items():
            (root / split / name).mkdir(parents=True)
            for i in range(2):
                Image.new("RGB", (300, 300), colour).save(root / split / name / f"{i}.png")
    for student in STUDENTS:
        splits = load_data(resolve({}, {"dataset": f"imagefolder:{root}", "student": student, "teacher": "test_resnet",
                                        "image_size": 224, "augment": False}))
        (x1, _), (x2, _) = splits.test[0], splits.test[2]
        c1, c2 = (torch.tensor(COLOURS[k], dtype=torch.float32) / 255 for k in ("a", "b"))
        std = (c1 - c2) / (x1.mean((1, 2)) - x2.mean((1, 2)))
        mean = c1 - x1.mean((1, 2)) * std
        resize, crop = splits.test.transform.transforms[:2]
        print(f"{student}: tensor {tuple(x1.shape)}, mean {[round(v, 3) for v in mean.tolist()]}, std "
              f"{[round(v, 3) for v in std.tolist()]}, resize shorter side to {resize.size} px "
              f"({resize.interpolation.value}), centre crop {tuple(crop.size)} (crop_pct {splits.crop_pct})")


def scan_cost(root: Path, images: int) -> None:
    rng = np.random.default_rng(0)
    for fmt, size in (("png", 64), ("jpg", 64), ("jpg", 256)):
        folder = root / f"{fmt}{size}"
        folder.mkdir(parents=True)
        for i in range(images):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.{fmt}")
        files = image_files(folder)
        unreadable(files)  # the files in the page cache, as on a second run
        started = time.perf_counter()
        unreadable(files)
        took = time.perf_counter() - started
        print(f"scan of {len(files)} {size}x{size} {fmt.upper()}s: {took * 1e3:.0f} ms ({took / len(files) * 1e6:.0f} us "
              "per image)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=300, help="images per format in the scan measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        reaching_tensors(Path(tmp) / "constant")
        scan_cost(Path(tmp) / "scan", args.images)


if __name__ == "__main__":
    main()
