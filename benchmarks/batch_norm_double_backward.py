"""One train-mode BatchNorm layer's double backward: PyTorch's composite against jacplug's closed form.

Times ``autograd.grad(gx, (x, weight), g)`` where ``gx`` is the layer's input gradient taken with
``create_graph=True`` (what an exact Jacobian term differentiates), interleaved, medians; checks the
two agree first.

    python benchmarks/batch_norm_double_backward.py                      # [64, 64, 56, 56], both layouts
    python benchmarks/batch_norm_double_backward.py --shape 64 512 7 7 --device cuda
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from jacplug.engine.batch_norm import batch_norm


def measure(shape: list[int], channels_last: bool, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    torch.manual_seed(0)
    layout = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(*shape, device=device, dtype=dtype).contiguous(memory_format=layout).requires_grad_(True)
    weight = torch.randn(shape[1], device=device, requires_grad=True)
    bias = torch.randn(shape[1], device=device, requires_grad=True)
    gy, g = torch.randn_like(x), torch.randn_like(x)
    graphs = {}
    for name, fn in (("pytorch", F.batch_norm), ("closed form", batch_norm)):
        (gx,) = torch.autograd.grad(fn(x, None, None, weight, bias, True), x, gy, create_graph=True)
        graphs[name] = gx
    first, second = (torch.autograd.grad(gx, (x, weight), g, retain_graph=True) for gx in graphs.values())
    for a, b in zip(first, second):
        torch.testing.assert_close(b.float(), a.float(), rtol=2e-2, atol=2e-2 * a.float().abs().max().item())
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {name: [] for name in graphs}
    for _ in range(repeats):
        for name, gx in graphs.items():
            sync()
            start = time.perf_counter()
            torch.autograd.grad(gx, (x, weight), g, retain_graph=True)
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", nargs=4, type=int, default=[64, 64, 56, 56], metavar=("N", "C", "H", "W"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true", help="bf16 maps, float32 parameters (as under autocast)")
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    device, dtype = torch.device(args.device), torch.bfloat16 if args.bf16 else torch.float32
    for channels_last in (False, True):
        ms = measure(args.shape, channels_last, device, dtype, args.repeats)
        print(f"{args.shape} {dtype} {'channels-last' if channels_last else 'contiguous'} on {device}: "
              f"PyTorch {ms['pytorch']:.2f} ms, closed form {ms['closed form']:.2f} ms "
              f"({ms['pytorch'] / ms['closed form']:.1f}x faster)")


if __name__ == "__main__":
    main()
