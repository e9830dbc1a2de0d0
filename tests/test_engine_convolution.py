"""Convolutions whose double backward runs convolution kernels: same values and first derivatives as
``F.conv*``, the same second derivatives as PyTorch's own (float64), the weight gradient skipped where
the backward pass does not use it, and the right dtypes under autocast."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from jacplug.engine import convolution
from jacplug.engine.convolution import conv1d, conv2d, conv3d

f64 = torch.float64

CASES = {
    "conv2d": (conv2d, F.conv2d, (2, 4, 5, 5), (6, 4, 3, 3), {"padding": 1}),
    "conv2d-stride-dilation": (conv2d, F.conv2d, (2, 4, 9, 8), (6, 4, 3, 3), {"stride": 2, "dilation": 2, "padding": (1, 2)}),
    "conv2d-grouped": (conv2d, F.conv2d, (2, 4, 5, 5), (8, 2, 3, 3), {"groups": 2, "padding": 1}),
    "conv2d-depthwise-channels-last": (conv2d, F.conv2d, (2, 4, 7, 7), (4, 1, 3, 3), {"groups": 4, "padding": 1}),
    "conv2d-1x1-stride": (conv2d, F.conv2d, (2, 4, 6, 6), (5, 4, 1, 1), {"stride": 2}),
    "conv1d": (conv1d, F.conv1d, (2, 3, 9), (4, 3, 3), {"padding": 1}),
    "conv3d": (conv3d, F.conv3d, (2, 2, 4, 4, 4), (3, 2, 3, 3, 3), {"stride": 2, "padding": 1}),
}


def _tensors(case: str, bias: bool):
    _, _, x_shape, w_shape, _ = CASES[case]
    x = torch.randn(*x_shape, dtype=f64)
    if case.endswith("channels-last"):
        x = x.contiguous(memory_format=torch.channels_last)
    return x, torch.randn(*w_shape, dtype=f64), torch.randn(w_shape[0], dtype=f64) if bias else None


@pytest.fixture(autouse=True)
def everywhere(monkeypatch, request):
    """The maths is tested on every case, including those a CPU runs natively by measured cost."""
    if request.node.name.startswith("test_native_paths"):
        return
    monkeypatch.setattr(convolution, "_native_is_faster", lambda input, weight, groups: False)


@pytest.mark.parametrize("case", CASES)
def test_gradgradcheck(case):
    ours, _, _, _, options = CASES[case]
    torch.manual_seed(0)
    leaves = [t.requires_grad_(True) for t in _tensors(case, bias=True)]
    fn = lambda x, w, b=None: ours(x, w, b, **options)  # noqa: E731
    assert torch.autograd.gradcheck(fn, leaves)
    assert torch.autograd.gradgradcheck(fn, leaves)


# which gradients of the first backward the loss uses: the input's (a Jacobian row), the parameters'
USES = {"grad-input": (1, 0, 0), "grad-params": (0, 1, 1), "all": (1, 1, 1)}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("use", USES)
@pytest.mark.parametrize("bias", [True, False])
def test_second_derivatives_match_pytorchs(case, use, bias):
    ours, native, _, _, options = CASES[case]
    torch.manual_seed(1)
    x0, w0, b0 = _tensors(case, bias)
    grad_out = torch.randn(native(x0, w0, b0, **options).shape, dtype=f64)
    probes = [torch.randn_like(t) for t in (x0, w0, b0) if t is not None]
    results = []
    for fn in (native, ours):
        x, w, gy = (t.clone().requires_grad_(True) for t in (x0, w0, grad_out))
        params = (w,) if b0 is None else (w, b0.clone().requires_grad_(True))
        y = fn(x * 1.0, *params, **options)  # a non-leaf input, as inside a network
        first = torch.autograd.grad(y, (x, *params), gy, create_graph=True)
        loss = sum((t * p).sum() * used for t, p, used in zip(first, probes, USES[use]))
        results.append(torch.autograd.grad(loss, (x, w, gy), allow_unused=True, materialize_grads=True))
    for theirs, mine in zip(*results):
        torch.testing.assert_close(mine, theirs)
    assert ours(x0.requires_grad_(True), w0, b0, **options).grad_fn.name() == "_ConvolutionBackward"


def test_weight_gradient_is_skipped_when_the_backward_does_not_use_it(monkeypatch):
    """A Jacobian row (``autograd.grad`` w.r.t. the input) asks the convolution backward for the input
    gradient only; ``backward()`` asks for all three."""
    masks = []
    real = convolution._convolution_backward
    monkeypatch.setattr(convolution, "_convolution_backward", lambda *a: (masks.append(tuple(a[-1])), real(*a))[1])
    x = torch.randn(2, 3, 5, 5, requires_grad=True)
    w, b = torch.randn(4, 3, 3, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    torch.autograd.grad(conv2d(x * 1.0, w, b).sum(), x, create_graph=True)
    conv2d(x * 1.0, w, b).sum().backward()
    torch.autograd.grad(conv2d(x * 1.0, w, b).sum(), w)
    assert masks == [(True, False, False), (True, True, True), (False, True, False)]
    assert w.grad is not None and b.grad is not None


def test_autocast_casts_like_the_native_convolution():
    x = torch.randn(2, 3, 6, 6, requires_grad=True)
    w, b = torch.randn(4, 3, 3, 3, requires_grad=True), torch.randn(4, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, native = conv2d(x, w, b, padding=1), F.conv2d(x, w, b, padding=1)
    assert ours.dtype == native.dtype == torch.bfloat16
    torch.testing.assert_close(ours, native)
    (gx,) = torch.autograd.grad(ours.float().pow(2).sum(), x, create_graph=True)
    gx.pow(2).sum().backward()
    assert w.grad.dtype == torch.float32 and torch.isfinite(w.grad).all()


def test_native_paths_for_what_it_does_not_cover():
    """String padding, unbatched inputs, no-grad mode and (by measured cost) grouped convolutions of
    contiguous maps on a CPU and 1x1 convolutions on CUDA run ``F.conv2d`` itself."""
    x, w = torch.randn(1, 4, 6, 6, requires_grad=True), torch.randn(4, 4, 3, 3, requires_grad=True)
    depthwise = torch.randn(4, 1, 3, 3, requires_grad=True)
    assert conv2d(x, w).grad_fn.name() == "_ConvolutionBackward"
    assert conv2d(x[0], w).grad_fn.name() != "_ConvolutionBackward"
    assert conv2d(x, w, padding="same").grad_fn.name() == "ConvolutionBackward0"
    assert conv2d(x, depthwise, groups=4).grad_fn.name() == "ConvolutionBackward0"
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert conv2d(channels_last, depthwise, groups=4).grad_fn.name() == "_ConvolutionBackward"
    pointwise = torch.randn(4, 4, 1, 1)
    assert conv2d(x, pointwise).grad_fn.name() == "_ConvolutionBackward"  # on a CPU jacplug's is kept
    on_cuda = SimpleNamespace(device=torch.device("cuda"))  # only the device is read for CUDA maps
    assert convolution._native_is_faster(on_cuda, pointwise, 1)  # 1x1 on CUDA: PyTorch's, by measured cost
    assert not convolution._native_is_faster(on_cuda, w, 1) and not convolution._native_is_faster(on_cuda, pointwise, 2)
    with torch.no_grad():
        assert conv2d(x, w).grad_fn is None
