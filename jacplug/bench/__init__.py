"""Cost of Jacobian-matching training steps, as ratios to a plain KD step measured in the same run.

The measuring code is :mod:`.measure` (torch, timm), imported on first use of its names; this module
itself holds only what the command line shows before anything is measured (method names, default
configurations), so ``jacplug --help`` stays fast. It knows nothing of the command line:
``jacplug bench`` (:mod:`jacplug.cli.cmd_bench`) is a thin layer over :func:`run`.
"""

from __future__ import annotations

import importlib
from typing import Any

#: every method :func:`.measure.methods` builds, in its order (a test keeps the two equal)
METHOD_NAMES = (
    "kd",
    "forum-eq10-top1",
    "eq10-top1",
    "eq10-top1-by-hand",
    "eq10-top1-cached",
    "eq10-top1-native-bn",
    "eq10-top1-native-conv",
    "eq10-top1-native",
    "projected-k1",
    "direction-fd",
    "direction-forward",
    "full-forum-loop",
    "full-loop",
    "full-batched",
)
#: the CPU default: a small CNN pair at 10 and 100 classes, and an MLP
DEFAULT_CONFIGS = ["resnet34->resnet18:10", "resnet34->resnet18:100", "mlp:10"]
#: the CUDA default: the small CNN case, ImageNet-sized inputs and classes, and a ViT student
DEFAULT_CUDA_CONFIGS = ["resnet34->resnet18:10@32", "resnet50->resnet18:1000@224",
                        "resnet34->vit_tiny_patch16_224(patch_size=4):10@32"]

_MEASURE = ("Runner", "Setup", "format_table", "make_setup", "measure_memory", "methods", "parse_config",
            "peak_rss_growth", "run")

__all__ = ["METHOD_NAMES", "DEFAULT_CONFIGS", "DEFAULT_CUDA_CONFIGS", *_MEASURE]


def __getattr__(name: str) -> Any:
    if name not in _MEASURE:
        raise AttributeError(f"module 'jacplug.bench' has no attribute {name!r}")
    return getattr(importlib.import_module("jacplug.bench.measure"), name)
