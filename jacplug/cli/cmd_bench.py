"""``jacplug bench``: the Jacobian step benchmark (same as benchmarks/jacobian_step.py).

The argument definitions live here, free of torch, so building the CLI parser stays fast; the
measuring code is :mod:`jacplug.bench`, imported only when the command runs.
"""

from __future__ import annotations

import argparse

#: must equal the keys of jacplug.bench.methods() (a test checks it)
METHODS = (
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
DEFAULT_CONFIGS = ["resnet34->resnet18:10", "resnet34->resnet18:100", "mlp:10"]
#: --device cuda: the small CNN case, ImageNet-sized inputs and classes, and a ViT student
DEFAULT_CUDA_CONFIGS = ["resnet34->resnet18:10@32", "resnet50->resnet18:1000@224",
                        "resnet34->vit_tiny_patch16_224(patch_size=4):10@32"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--configs", nargs="+", metavar="MODELS:CLASSES[@SIZE]",
                        help="TEACHER->STUDENT:C[@SIZE] (timm names, optionally NAME(key=value,...)) or mlp:C "
                             f"(default on CPU: {' '.join(DEFAULT_CONFIGS)}; on CUDA: {' '.join(DEFAULT_CUDA_CONFIGS)})")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, metavar="METHOD",
                        help="methods to measure besides kd (default: all): " + ", ".join(METHODS))
    parser.add_argument("--repeats", type=int, default=7, help="interleaved rounds; medians are reported")
    parser.add_argument("--full-repeats", type=int, default=1, help="rounds for the expensive full-* methods")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=32, help="for configs without @SIZE (default 32)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--memory", default="saved", choices=["saved", "rss"],
                        help="CPU memory measure: autograd saved bytes (fast upper bound) or peak RSS growth "
                             "in a fresh process per method (slower, the real high-water mark)")
    parser.add_argument("--amp", action="store_true", help="bf16 autocast for the forward passes (CUDA)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last models and inputs (CUDA)")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="also measure every method captured in a CUDA graph, beside the eager step")
    parser.add_argument("--json", metavar="PATH", help="also write the rows as JSON")


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure Jacobian-matching step cost as ratios to a plain KD step")
    add_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from ..bench import main_from_args

    return main_from_args(args)
