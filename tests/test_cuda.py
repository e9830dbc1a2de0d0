"""CUDA-only checks (skipped without a GPU): the CUDA-graphed step against the eager one, and the
double-differentiable attention student on CUDA's fused kernels, the BatchNorm and convolution double backwards on
CUDA kernels. benchmarks/gpu_check.sh runs them."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from jacplug import Distiller
from jacplug.losses import build_loss

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def convnet(classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, stride=2, padding=1),
        nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, classes),
    )


def _losses(graphed: bool, steps: int = 8) -> tuple[list[float], list[torch.Tensor]]:
    torch.manual_seed(0)
    device = torch.device("cuda")
    student, teacher = convnet().to(device), convnet().to(device).eval().requires_grad_(False)
    loss = build_loss(["kd=1", "jacobian=10"])
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3, fused=True)
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(16, 3, 16, 16, generator=g), torch.randint(0, 10, (16,), generator=g)) for _ in range(steps)]
    batches.append((torch.randn(5, 3, 16, 16, generator=g), torch.randint(0, 10, (5,), generator=g)))  # smaller: eager

    distiller = Distiller(student, teacher, loss, amp=False, capture=graphed)
    out = []
    for x, y in batches:
        out.append(float(distiller.step(optimizer, x.to(device), y.to(device))["loss"]))
    step = distiller.captured_step
    assert step.captured == graphed and (step.replays == steps - 3 if graphed else step.replays == 0)
    return out, [p.detach().clone() for p in student.parameters()]


def test_captured_step_trains_exactly_like_the_eager_step():
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = True, False
    eager, eager_params = _losses(graphed=False)
    graphed, graphed_params = _losses(graphed=True)
    assert graphed == pytest.approx(eager, rel=1e-4, abs=1e-6)
    for a, b in zip(graphed_params, eager_params):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_vit_student_exact_term_runs_on_cuda_fused_attention():
    import timm

    device = torch.device("cuda")
    student = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=4, depth=2, num_classes=10).to(device)
    teacher = convnet().to(device).eval().requires_grad_(False)
    loss = build_loss(["kd=1", "jacobian=10"])
    x, y = torch.randn(8, 3, 32, 32, device=device), torch.randint(0, 10, (8,), device=device)
    Distiller(student, teacher, loss, amp=torch.bfloat16)(x, y)["loss"].backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in student.blocks[0].attn.parameters())


def test_train_with_cuda_graphs_matches_eager_first_losses(tmp_path):
    from jacplug.training.config import TrainConfig
    from jacplug.commands.train_run import train

    losses = {}
    for mode in ("off", "on"):
        out = tmp_path / mode
        summary = train(TrainConfig(teacher="resnet10t", student="resnet10t", epochs=1, teacher_epochs=1,
                                    max_steps_per_epoch=10, out=str(out), cuda_graphs=mode, device="cuda",
                                    save_every=0, progress=False))
        assert summary["student_step_mode"] == ("CUDA graph" if mode == "on" else "eager")
        records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        losses[mode] = [r["loss"] for r in records if r.get("kind") == "step"]
    assert len(losses["on"]) == 10
    # bf16 autocast and cuDNN's autotuned algorithms differ slightly run to run
    assert losses["on"] == pytest.approx(losses["off"], rel=2e-2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_closed_form_batch_norm_double_backward_on_cuda(dtype):
    """On CUDA's kernels (channels-last, float32 and bf16 maps with float32 parameters, as under
    autocast) the closed-form second derivatives are as close to float64 as PyTorch's own."""
    import torch.nn.functional as F

    from jacplug.engine.batch_norm import batch_norm

    torch.manual_seed(0)
    x0, gy0, probe = (torch.randn(32, 16, 8, 8, dtype=torch.float64) for _ in range(3))
    w0 = torch.randn(16, dtype=torch.float64)

    def second(fn, device, map_dtype):
        as_map = lambda t: t.to(device, map_dtype).contiguous(memory_format=torch.channels_last)  # noqa: E731
        x, gy = (as_map(t).requires_grad_(True) for t in (x0, gy0))
        w = w0.to(device, torch.float64 if map_dtype == torch.float64 else torch.float32).requires_grad_(True)
        gx, = torch.autograd.grad(fn(x, None, None, w, None, True), x, gy, create_graph=True)
        return [t.double().cpu() for t in torch.autograd.grad((gx * as_map(probe)).sum(), (x, w, gy))]

    exact = second(F.batch_norm, "cpu", torch.float64)
    error = {name: [((g - e).norm() / e.norm()).item() for g, e in zip(second(fn, "cuda", dtype), exact)]
             for name, fn in (("native", F.batch_norm), ("ours", batch_norm))}
    for ours, native in zip(error["ours"], error["native"]):
        assert ours <= max(1.5 * native, 1e-5 if dtype == torch.float32 else 1e-2), error


@pytest.mark.parametrize("groups", [1, 16])
def test_convolution_double_backward_on_cuda(groups):
    """cuDNN's kernels behind the convolution substitution (bf16, channels-last, dense and depthwise):
    the weight's second derivative as close to float64 as PyTorch's own."""
    import torch.nn.functional as F

    from jacplug.engine.convolution import conv2d

    torch.manual_seed(0)
    x0, w0 = torch.randn(32, 16, 8, 8, dtype=torch.float64), torch.randn(16, 16 // groups, 3, 3, dtype=torch.float64)
    v = torch.randn(32, 16, 8, 8, dtype=torch.float64)

    def second(fn, device, dtype):
        as_map = lambda t: t.to(device, dtype).contiguous(memory_format=torch.channels_last)  # noqa: E731
        x, w = as_map(x0).requires_grad_(True), w0.to(device, dtype).requires_grad_(True)
        h = x * 1.0
        row, = torch.autograd.grad(fn(h, w, None, 1, 1, 1, groups), h, as_map(v), create_graph=True)
        return torch.autograd.grad(row.float().pow(2).sum(), w)[0].double().cpu()

    exact = second(F.conv2d, "cpu", torch.float64)
    error = {name: ((second(fn, "cuda", torch.bfloat16) - exact).norm() / exact.norm()).item()
             for name, fn in (("native", F.conv2d), ("ours", conv2d))}
    assert error["ours"] <= max(1.5 * error["native"], 1e-2), error
