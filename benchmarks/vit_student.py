"""A transformer student with few samples: a CNN teacher (resnet10t) distilled into timm's
``test_vit`` (a 6-block ViT, width 64, 0.25 M parameters, patches of 4x4 pixels), the DeiT setting
of a convolutional teacher helping a data-hungry ViT. CE, KD and KD + Jacobian (Eq. 10) at 1, 5 and
10 images per class, 5 seeds; the Jacobian weight is chosen on the validation split.

The exact Eq. 10 term needs the student's double backward through attention; jacplug runs the
student under ``jacplug.double_differentiable()`` (math attention) for that. ViTs learn slowly from
scratch, so the runs take 300 steps of batch 64 at learning rate 1e-3 (a short pilot: 100 steps of
batch 32 at 2e-3 left the ViT near 25 %).

Usage: ``python benchmarks/vit_student.py [--out runs/vit-student] [jacplug experiment options]``;
any option given here replaces the protocol's. The published run is docs/results.md.
"""

from __future__ import annotations

import sys

from jacplug.cli.main import main

PROTOCOL = [
    "--student", "test_vit", "--student-kwargs", "patch_size=4",
    "--methods", "ce", "kd", "kd+jacobian", "--samples-per-class", "1", "5", "10", "--seeds", "5",
    "--steps", "300", "--batch-size", "64", "--lr", "1e-3",
    "--select-at", "5", "--select-seeds", "2", "--jacobian-weights", "1", "3", "10", "30", "100",
    "--out", "runs/vit-student",
]

if __name__ == "__main__":
    raise SystemExit(main(["experiment", *PROTOCOL, *sys.argv[1:]]))
