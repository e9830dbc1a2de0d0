"""Train-mode BatchNorm whose double backward is a closed form.

An exact Jacobian term back-propagates through the student's backward pass, so every train-mode
BatchNorm layer is differentiated twice. PyTorch's derivative of ``native_batch_norm_backward`` is a
generic composite (dozens of kernels per layer, most of them full-size products, reductions and
dtype copies), a large share of an exact step's time on a GPU (docs/jacobian.md has the measured
profile). :func:`batch_norm` computes the same forward and first backward with the native
kernels and differentiates the backward with the closed form below: three reductions and five
fused multiply-adds over the feature map.

The maths, per channel, with ``E`` the mean over the ``M`` elements of a channel (batch and space),
``xhat = (x - mu) * inv``, ``inv = 1 / sqrt(var + eps)`` and the projection
``P(v) = v - E[v] - xhat * E[v * xhat]`` (self-adjoint under ``E``):

- backward: ``gx = gamma * inv * P(gy)``, ``ggamma = M * E[gy * xhat]``, ``gbeta = M * E[gy]``;
- its derivative, given ``g = dL/dgx`` (and ``dL/dggamma = h``, ``dL/dgbeta = k`` per channel):

  ``dL/dgy    = gamma * inv * P(g) + h * xhat + k``
  ``dL/dx     = -gamma * inv**2 * (c1 * xhat + E[gy * xhat] * P(g) + E[g * xhat] * P(gy)) + h * inv * P(gy)``
  ``dL/dgamma = M * inv * c1``, with ``c1 = E[g * P(gy)]``

(from ``d inv = -inv**2 E[xhat dx]`` and ``d xhat = inv P(dx)``). Expanding ``P`` turns each
output into ``sum_i coefficient_i * tensor_i`` with per-channel coefficients, which is how it is
computed. Tested against PyTorch's own double backward and ``gradgradcheck`` in float64.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .backward_pass import is_vmapped


def _per_channel(values: Tensor, like: Tensor) -> Tensor:
    """``[C]`` -> ``[1, C, 1, ...]``, broadcastable against ``like`` ``[N, C, *spatial]``."""
    return values.reshape([1, -1] + [1] * (like.dim() - 2))


class _TrainBatchNorm(torch.autograd.Function):
    """Native train-mode BatchNorm (running statistics updated in place); backward below.

    The Functions here define ``forward(ctx, ...)`` rather than ``setup_context``: ``apply`` then
    skips binding its arguments through ``inspect.signature`` (tens of microseconds a call, which an
    eager GPU step bound by the host pays per layer). The cost: ``torch.func`` transforms cannot
    trace them; jacplug's engine uses plain autograd."""

    @staticmethod
    def forward(ctx: Any, input, weight, bias, running_mean, running_var, momentum, eps):
        out, mean, invstd = torch.native_batch_norm(input, weight, bias, running_mean, running_var, True, momentum, eps)
        ctx.save_for_backward(input, weight, mean, invstd)
        ctx.eps, ctx.has_bias = eps, bias is not None
        ctx.mark_non_differentiable(mean, invstd)
        ctx.set_materialize_grads(False)  # no zero tensors for the statistics' (absent) gradients
        return out, mean, invstd

    @staticmethod
    def backward(ctx: Any, grad_out: Tensor, _grad_mean: Tensor, _grad_invstd: Tensor) -> tuple:
        if grad_out is None:
            return (None,) * 7
        input, weight, mean, invstd = ctx.saved_tensors
        if torch.is_grad_enabled() and not is_vmapped(grad_out):  # a backward that builds a graph
            grads = _BatchNormBackward.apply(grad_out, input, weight, mean, invstd, ctx.eps)
        else:  # no graph, or a vmapped one (vmap records only the native op's derivative)
            mask = [True, weight is not None, ctx.has_bias]
            grads = torch.ops.aten.native_batch_norm_backward(
                grad_out, input, weight, None, None, mean, invstd, True, ctx.eps, mask)
        grad_input, grad_weight, grad_bias = grads
        return (grad_input, grad_weight if weight is not None else None, grad_bias if ctx.has_bias else None,
                None, None, None, None)


class _BatchNormBackward(torch.autograd.Function):
    """``native_batch_norm_backward`` in training mode, differentiated by the closed form."""

    @staticmethod
    def forward(ctx: Any, grad_out, input, weight, mean, invstd, eps):
        # weight and bias gradients are always computed: they are the sums E[gy xhat], E[gy] the
        # closed form needs
        grads = torch.ops.aten.native_batch_norm_backward(
            grad_out, input, weight, None, None, mean, invstd, True, eps, [True, True, True])
        ctx.save_for_backward(grad_out, input, weight, mean, invstd, grads[1], grads[2])
        ctx.set_materialize_grads(False)  # unused outputs (a Jacobian row uses only gx) arrive as None
        return grads

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx: Any, g: Tensor | None, g_weight: Tensor | None, g_bias: Tensor | None) -> tuple:
        gy, x, weight, mean, invstd, sum_gy_xhat, sum_gy = ctx.saved_tensors
        acc = torch.promote_types(x.dtype, torch.float32)  # reduce and combine bf16/fp16 maps in float32
        dims = [0, *range(2, x.dim())]
        m = x.numel() // x.shape[1]
        inv = _per_channel(invstd, x).to(acc)
        gamma_inv = inv * _per_channel(weight, x).to(acc) if weight is not None else inv
        s_gy = _per_channel(sum_gy, x).to(acc)  # M E[gy]
        s_gy_xhat = _per_channel(sum_gy_xhat, x).to(acc)  # M E[gy xhat]
        centred = x.to(acc) - _per_channel(mean, x).to(acc)  # x - mu = xhat / inv
        # dL/dx = centred * x_c + gy * x_gy + g * x_g + x_0;  dL/dgy = centred * gy_c + g * gamma_inv + gy_0
        # (per-channel coefficients; the sums below are over a channel, M elements, so means are sums / M)
        x_c = x_gy = x_g = x_0 = gy_c = gy_0 = None
        d_weight = None
        if g is not None:
            s_g = g.sum(dims, keepdim=True, dtype=acc)
            s_g_xhat = inv * (g * centred).sum(dims, keepdim=True)
            # M c1 = sum g gy - E[gy] sum g - E[gy xhat] sum g xhat
            m_c1 = torch.addcmul(g.mul(gy).sum(dims, keepdim=True, dtype=acc), s_gy, s_g, value=-1 / m)
            m_c1.addcmul_(s_gy_xhat, s_g_xhat, value=-1 / m)
            gamma_inv2 = gamma_inv * inv
            x_c = torch.addcmul(m_c1, s_gy_xhat, s_g_xhat, value=-2 / m).mul_(gamma_inv2 * inv).mul_(-1 / m)
            x_gy = gy_c = gamma_inv2 * s_g_xhat * (-1 / m)
            x_g = gamma_inv2 * s_gy_xhat * (-1 / m)
            x_0 = torch.addcmul(s_gy_xhat * s_g, s_gy, s_g_xhat).mul_(gamma_inv2 * (1 / m**2))
            gy_0 = gamma_inv * s_g * (-1 / m)
            if weight is not None and ctx.needs_input_grad[2]:
                d_weight = (inv * m_c1).reshape(-1).to(weight.dtype)
        if g_weight is not None:  # ggamma = sum gy * xhat
            h_inv = _per_channel(g_weight, x).to(acc) * inv
            gy_c = _plus(gy_c, h_inv)
            x_gy = _plus(x_gy, h_inv)
            x_c = _plus(x_c, h_inv * inv * s_gy_xhat * (-1 / m))
            x_0 = _plus(x_0, h_inv * s_gy * (-1 / m))
        if g_bias is not None:  # gbeta = sum gy
            gy_0 = _plus(gy_0, _per_channel(g_bias, x).to(acc))
        d_gy = d_x = None
        if ctx.needs_input_grad[0]:
            d_gy = _combine(gy_0, (centred, gy_c), (g, gamma_inv if g is not None else None), like=gy)
        if ctx.needs_input_grad[1]:
            d_x = _combine(x_0, (centred, x_c), (gy, x_gy), (g, x_g), like=x)
        return d_gy, d_x, d_weight, None, None, None


def _plus(total: Tensor | None, term: Tensor) -> Tensor:
    return term if total is None else total + term


def _combine(constant: Tensor | None, *terms: tuple[Tensor | None, Tensor | None], like: Tensor) -> Tensor:
    """``constant + sum_i tensor_i * coefficient_i`` (per-channel coefficients; ``None`` terms
    skipped), one fused multiply-add per term, in ``like``'s dtype."""
    total = None
    for tensor, coefficient in terms:
        if tensor is None or coefficient is None:
            continue
        if total is None:
            total = tensor * coefficient if constant is None else torch.addcmul(constant, tensor, coefficient)
        else:
            total.addcmul_(tensor, coefficient)
    if total is None:  # only a constant (a loss on the bias gradient alone), or nothing
        total = torch.zeros_like(like, dtype=torch.promote_types(like.dtype, torch.float32))
        if constant is not None:
            total += constant
    return total.to(like.dtype)


def batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``F.batch_norm`` (same signature, values, running-statistics update and first derivatives)
    whose train-mode double backward is the closed form of this module. With running statistics
    (eval mode) the layer is affine and its native double backward is already cheap."""
    if not training:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    if input.dim() < 2 or input.numel() // input.shape[1] <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(input.shape)}")
    return _TrainBatchNorm.apply(input, weight, bias, running_mean, running_var, momentum, eps)[0]
