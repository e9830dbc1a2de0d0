"""Cost of Jacobian-matching training steps, as ratios to a plain KD step measured in the same run.

The measuring code is :mod:`.measure` (torch, timm), imported on first use of its names; this module
itself holds only what the command line shows before anything is measured (method names, default
configurations), so ``jacplug --help`` stays fast. It knows nothing of the command line:
``jacplug bench`` (:mod:`jacplug.cli.cmd_bench`) is a thin layer over :func:`run`.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._lazy import lazy_attributes
from ..config_fields import option

#: every method :func:`.measure.methods` builds, in its order (a test keeps the two equal), and what its step
#: computes, one line each: ``jacplug bench`` prints the lines of the methods it measures before it starts
METHODS = {
    "kd": "KD only, through jacplug.Distiller: the unit every ratio is to",
    "forum-eq10-top1": "Eq. 10 as commonly hand-written: create_graph=True for both rows, the teacher's graph kept",
    "eq10-top1": "jacplug's kd + jacobian (Eq. 10, teacher top-1 row without graph, one backward): what train runs",
    "eq10-top1-by-hand": "eq10-top1 written from the engine without the Distiller: the Distiller's overhead",
    "eq10-top1-cached": "eq10-top1 with the teacher's logits and rows computed ahead (--cache-teacher)",
    "eq10-top1-native-bn": "eq10-top1 with PyTorch's own BatchNorm double backward instead of jacplug's",
    "eq10-top1-native-conv": "eq10-top1 with PyTorch's own convolution double backward instead of jacplug's",
    "eq10-top1-native": "eq10-top1 with PyTorch's own BatchNorm and convolution double backwards",
    "projected-k1": "kd + jacobian-projected: all classes through one random output projection",
    "direction-fd": "kd + jacobian-direction: all classes through one random input direction, finite differences",
    "direction-forward": "kd + jacobian-direction with forward-mode AD",
    "full-forum-loop": "all classes, the common hand-written per-class backward(create_graph=True) loop",
    "full-loop": "all classes: jacplug's jacobian with classes=all, loop backend (one VJP per class)",
    "full-batched": "all classes: the same with the batched backend (is_grads_batched)",
}
METHOD_NAMES = tuple(METHODS)
#: the CPU default: a small CNN pair at 10 and 100 classes, and an MLP
DEFAULT_CONFIGS = ["resnet34->resnet18:10", "resnet34->resnet18:100", "mlp:10"]
#: the CUDA default: the small CNN case, ImageNet-sized inputs and classes, and a ViT student
DEFAULT_CUDA_CONFIGS = ["resnet34->resnet18:10@32", "resnet50->resnet18:1000@224",
                        "resnet34->vit_tiny_patch16_224(patch_size=4):10@32"]

@dataclass
class BenchConfig:
    """What ``jacplug bench`` measures; each field is also its flag and config-file key (:mod:`jacplug.config_fields`)."""

    configs: list[str] = option(default_factory=list, metavar="MODELS:CLASSES[@SIZE]",
                                help="TEACHER->STUDENT:C[@SIZE] (timm names, optionally NAME(KEY=VALUE,...)) or "
                                     f"mlp:C (none: on CPU {' '.join(DEFAULT_CONFIGS)}; on CUDA "
                                     f"{' '.join(DEFAULT_CUDA_CONFIGS)})")
    methods: list[str] = option(default_factory=lambda: list(METHOD_NAMES), choices=METHOD_NAMES, metavar="METHOD",
                                help="methods to measure besides kd (the run prints a line on each it measures): "
                                     + ", ".join(METHOD_NAMES))
    repeats: int = option(7, help="interleaved rounds; medians are reported")
    full_repeats: int = option(1, help="rounds for the expensive full-* methods")
    batch_size: int = option(16, help="images per step")
    image_size: int = option(32, help="input size for configs without @SIZE")
    device: str = option("cpu", choices=("cpu", "cuda"), help="where to measure")
    threads: int | None = option(None, help="torch.set_num_threads (none: torch's)")
    memory: str = option("saved", choices=("saved", "rss"),
                         help="CPU memory measure: autograd saved bytes (fast upper bound) or peak RSS growth in a "
                              "fresh process per method (slower, the real high-water mark)")
    amp: bool = option(False, help="bf16 autocast for the forward passes (CUDA)")
    channels_last: bool = option(False, help="channels-last models and inputs (CUDA)")
    cuda_graphs: bool = option(False, help="also measure every method captured in a CUDA graph, beside the eager step")
    json: str | None = option(None, metavar="PATH", help="also write the rows as JSON to PATH")


_MEASURE = ("Runner", "Setup", "format_table", "make_setup", "measure_memory", "methods", "parse_config",
            "peak_rss_growth", "run", "variants")

__all__ = ["BenchConfig", "METHODS", "METHOD_NAMES", "DEFAULT_CONFIGS", "DEFAULT_CUDA_CONFIGS", *_MEASURE]
__getattr__ = lazy_attributes(__name__, dict.fromkeys(_MEASURE, "jacplug.bench.measure"))
