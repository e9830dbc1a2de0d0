"""One layer's double backward: PyTorch's derivative against jacplug's (BatchNorm and convolutions).

Times what an exact Jacobian term makes of one layer, with the layer's input a non-leaf as inside a
network: the forward, the input gradient with ``create_graph=True`` (the Jacobian row) and the
gradient of ``|row|^2`` w.r.t. the weight and the input (the double backward). Interleaved, medians;
the two are checked to agree first.

    python benchmarks/double_backward_layers.py                     # every layer, both layouts, CPU
    python benchmarks/double_backward_layers.py --device cuda --bf16
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch
import torch.nn.functional as F

from jacplug.engine.batch_norm import batch_norm
from jacplug.engine.convolution import conv2d

#: name -> (input shape, weight shape, PyTorch's layer, jacplug's layer); ImageNet ResNet and
#: ConvNeXt layer sizes at batch 32
LAYERS: dict[str, tuple[tuple[int, ...], tuple[int, ...], Callable, Callable]] = {
    "batch-norm [32, 64, 56, 56]": (
        (32, 64, 56, 56), (64,),
        lambda x, w: F.batch_norm(x, None, None, w, None, True), lambda x, w: batch_norm(x, None, None, w, None, True)),
    "conv 3x3 64->64 [32, 64, 56, 56]": (
        (32, 64, 56, 56), (64, 64, 3, 3), lambda x, w: F.conv2d(x, w, padding=1), lambda x, w: conv2d(x, w, padding=1)),
    "conv 3x3 stride 2 64->128": (
        (32, 64, 56, 56), (128, 64, 3, 3),
        lambda x, w: F.conv2d(x, w, stride=2, padding=1), lambda x, w: conv2d(x, w, stride=2, padding=1)),
    "conv 1x1 256->256 [32, 256, 14, 14]": (
        (32, 256, 14, 14), (256, 256, 1, 1), lambda x, w: F.conv2d(x, w), lambda x, w: conv2d(x, w)),
    "depthwise 7x7 [32, 96, 28, 28]": (
        (32, 96, 28, 28), (96, 1, 7, 7),
        lambda x, w: F.conv2d(x, w, padding=3, groups=96), lambda x, w: conv2d(x, w, padding=3, groups=96)),
}


def _step(layer: Callable, x: torch.Tensor, w: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    h = x * 1.0  # a non-leaf input
    y = layer(h, w)
    (row,) = torch.autograd.grad(y, h, v, create_graph=True)
    return torch.autograd.grad(row.float().pow(2).sum(), (w, x), allow_unused=True, materialize_grads=True)


def measure(name: str, channels_last: bool, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    x_shape, w_shape, native, ours = LAYERS[name]
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(*x_shape, device=device, dtype=dtype).contiguous(memory_format=layout).requires_grad_(True)
    w = torch.randn(*w_shape, device=device, dtype=dtype if len(w_shape) > 1 else torch.float32).requires_grad_(True)
    with torch.no_grad():
        v = torch.randn_like(native(x, w))  # the output direction of the row
    for a, b in zip(_step(native, x, w, v), _step(ours, x, w, v)):
        scale = a.float().abs().max().item()
        torch.testing.assert_close(b.float(), a.float(), rtol=5e-2, atol=5e-2 * scale)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {"pytorch": [], "jacplug": []}
    for _ in range(repeats):
        for label, layer in (("pytorch", native), ("jacplug", ours)):
            sync()
            start = time.perf_counter()
            _step(layer, x, w, v)
            sync()
            times[label].append(time.perf_counter() - start)
    return {label: 1e3 * statistics.median(t) for label, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 maps (float32 BatchNorm weight, as under autocast)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--layers", nargs="+", choices=list(LAYERS), default=list(LAYERS), metavar="LAYER")
    args = parser.parse_args()
    device, dtype = torch.device(args.device), torch.bfloat16 if args.bf16 else torch.float32
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    card = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"# one layer: forward, Jacobian row, double backward; {dtype}, {card}, torch {torch.__version__}, "
          f"medians of {args.repeats}")
    for name in args.layers:
        for channels_last in (False, True):
            ms = measure(name, channels_last, device, dtype, args.repeats)
            layout = "channels-last" if channels_last else "contiguous"
            print(f"{name:<36} {layout:<13} PyTorch {ms['pytorch']:8.2f} ms   jacplug {ms['jacplug']:8.2f} ms   "
                  f"{ms['pytorch'] / ms['jacplug']:5.2f}x")


if __name__ == "__main__":
    main()
