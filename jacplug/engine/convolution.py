"""Convolutions whose double backward runs the convolution's own backward kernels.

An exact Jacobian term takes each convolution's input gradient ``gI = conv_transpose(gO, W)`` with
``create_graph=True`` and then differentiates it. Its derivative w.r.t. the weight, given
``g = dL/dgI``, is the weight gradient of a convolution with input ``g`` and output gradient ``gO``
(from ``<g, conv_transpose(gO, W)> = <conv(g, W), gO>``), which the convolution's backward-filter
kernel computes. PyTorch's generic derivative (``_convolution_double_backward``) computes it instead
as a convolution of batch-transposed, copied tensors, shapes cuDNN has no tuned algorithm for (on an
H200 its generic implicit-GEMM kernels were the largest convolution kernels of a 224 px exact step),
and for a grouped (depthwise) convolution one convolution per group. :func:`conv2d` (and ``conv1d``,
``conv3d``) run the native forward and first backward and differentiate the backward as

- ``dL/dgO = conv(g, W) + conv(x, h) + k`` (``h``, ``k``: the upstream gradients of the weight and
  bias gradients, when a loss uses them),
- ``dL/dW  = backward-filter(input=g, grad_output=gO)``,
- ``dL/dx  = backward-data(weight=h, grad_output=gO)``,

all the convolution's own forward and backward kernels (cuDNN tunes them with
``cudnn.benchmark``). The first backward also skips the weight and bias gradients when the running
backward pass does not use them (a Jacobian row needs only the input gradient), as PyTorch's own
backward does. Tested against PyTorch's derivatives and ``gradgradcheck`` in float64.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .backward_pass import autocast_dtype, is_vmapped, will_use_gradient


def _attach(t: Tensor | None) -> Tensor | None:
    """A leaf that requires grad as a view, so :func:`will_use_gradient` can ask about its node."""
    return t.view_as(t) if t is not None and t.requires_grad and t.grad_fn is None else t


class _Convolution(torch.autograd.Function):
    """Native convolution; backward below. (``forward(ctx, ...)`` rather than ``setup_context``, for
    the reason given in :mod:`jacplug.engine.batch_norm`.)"""

    @staticmethod
    def forward(ctx: Any, input, weight, bias, stride, padding, dilation, groups):
        ctx.save_for_backward(input, weight)
        ctx.conv = (stride, padding, dilation, groups)
        ctx.bias_sizes = None if bias is None else list(bias.shape)
        ctx.set_materialize_grads(False)
        return torch.convolution(input, weight, bias, stride, padding, dilation, False, [0] * len(stride), groups)

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor | None) -> tuple:
        if grad_out is None:
            return (None,) * 7
        input, weight = ctx.saved_tensors
        mask = [ctx.needs_input_grad[i] and will_use_gradient(ctx, i) for i in range(3)]
        if not any(mask):
            return (None,) * 7
        if torch.is_grad_enabled() and not is_vmapped(grad_out):  # a backward that builds a graph
            grads = _ConvolutionBackward.apply(grad_out, input, weight, ctx.bias_sizes, ctx.conv, mask)
        else:  # no graph, or a vmapped one (vmap records only the native op's derivative)
            grads = _convolution_backward(grad_out, input, weight, ctx.bias_sizes, ctx.conv, mask)
        return (*grads, None, None, None, None)


def _convolution_backward(grad_out: Tensor, input: Tensor, weight: Tensor, bias_sizes: list[int] | None,
                          conv: tuple, mask: Sequence[bool]) -> tuple:
    stride, padding, dilation, groups = conv
    return torch.ops.aten.convolution_backward(
        grad_out, input, weight, bias_sizes, stride, padding, dilation, False, [0] * len(stride), groups, list(mask))


class _ConvolutionBackward(torch.autograd.Function):
    """``convolution_backward``, differentiated with convolution kernels."""

    @staticmethod
    def forward(ctx: Any, grad_out, input, weight, bias_sizes, conv, mask):
        ctx.save_for_backward(grad_out, input, weight)
        ctx.conv = conv
        ctx.set_materialize_grads(False)
        return _convolution_backward(grad_out, input, weight, bias_sizes, conv, mask)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g_input: Tensor | None, g_weight: Tensor | None, g_bias: Tensor | None) -> tuple:
        grad_out, input, weight = ctx.saved_tensors
        stride, padding, dilation, groups = ctx.conv
        needs = ctx.needs_input_grad
        d_grad_out = d_input = d_weight = None
        if needs[0]:
            terms = []
            if g_input is not None:
                terms.append(torch.convolution(g_input, weight, None, stride, padding, dilation, False,
                                               [0] * len(stride), groups))
            if g_weight is not None:
                terms.append(torch.convolution(input, g_weight, None, stride, padding, dilation, False,
                                               [0] * len(stride), groups))
            if g_bias is not None:
                terms.append(g_bias.reshape([1, -1] + [1] * len(stride)).expand_as(grad_out))
            d_grad_out = sum(terms[1:], terms[0]) if terms else None
        if needs[1] and g_weight is not None:
            d_input = _convolution_backward(grad_out, input, g_weight, None, ctx.conv, (True, False, False))[0]
        if needs[2] and g_input is not None:
            d_weight = _convolution_backward(grad_out, g_input, weight, None, ctx.conv, (False, True, False))[1]
        return d_grad_out, d_input, d_weight, None, None, None


def _autocast(t: Tensor | None, dtype: torch.dtype | None) -> Tensor | None:
    """What autocast does to a convolution's argument: floating tensors other than float64 in ``dtype``."""
    if t is None or dtype is None or not t.is_floating_point() or t.dtype == torch.float64:
        return t
    return t.to(dtype)


def _native_is_faster(input: Tensor, weight: Tensor, groups: int) -> bool:
    """Where PyTorch's own double backward was measured faster, so it is kept (figures in docs/jacobian.md):

    - grouped convolutions of contiguous (not channels-last) maps on a CPU: oneDNN's grouped
      backward-filter kernel is slower than PyTorch's per-group derivative there (in channels-last
      jacplug's wins; measured on a depthwise layer);
    - 1x1 convolutions on CUDA: both derivatives are plain matrix products there, and PyTorch's took
      0.75-0.82x the time of jacplug's on an H200 (bf16 and float32, contiguous and channels-last),
      while every larger kernel measured was faster with jacplug's or within 6 %.
    """
    if input.device.type == "cpu":
        return groups > 1 and not input.is_contiguous(memory_format=torch.channels_last)
    return input.device.type == "cuda" and groups == 1 and all(size == 1 for size in weight.shape[2:])


def _convolution(native, spatial: int, input: Tensor, weight: Tensor, bias: Tensor | None = None,
                 stride: Any = 1, padding: Any = 0, dilation: Any = 1, groups: int = 1) -> Tensor:
    if (isinstance(padding, str) or input.dim() != spatial + 2 or not torch.is_grad_enabled()
            or _native_is_faster(input, weight, groups)):
        return native(input, weight, bias, stride, padding, dilation, groups)  # string padding, unbatched
    expand = lambda v: [v] * spatial if isinstance(v, int) else list(v)  # noqa: E731
    device = input.device.type
    dtype = autocast_dtype(device)
    input, weight, bias = (_autocast(t, dtype) for t in (input, weight, bias))
    return _Convolution.apply(input, _attach(weight), _attach(bias), expand(stride), expand(padding),
                              expand(dilation), groups)


def conv1d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1, padding: Any = 0,
           dilation: Any = 1, groups: int = 1) -> Tensor:
    """``F.conv1d`` with the double backward of this module."""
    return _convolution(F.conv1d, 1, input, weight, bias, stride, padding, dilation, groups)


def conv2d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1, padding: Any = 0,
           dilation: Any = 1, groups: int = 1) -> Tensor:
    """``F.conv2d`` with the double backward of this module (string padding runs natively)."""
    return _convolution(F.conv2d, 2, input, weight, bias, stride, padding, dilation, groups)


def conv3d(input: Tensor, weight: Tensor, bias: Tensor | None = None, stride: Any = 1, padding: Any = 0,
           dilation: Any = 1, groups: int = 1) -> Tensor:
    """``F.conv3d`` with the double backward of this module."""
    return _convolution(F.conv3d, 3, input, weight, bias, stride, padding, dilation, groups)
