"""Run a model so that a Jacobian term can differentiate through it once more.

A Jacobian term differentiates the student twice: the exact terms build ``J = ds/dx`` with
``create_graph=True`` and then back-propagate through that backward pass ("double backward"); the
forward-mode terms compute ``J u`` with forward-mode AD and then back-propagate through the tangent
("forward-over-reverse"). Some PyTorch kernels cannot take part:

- **double backward**: fused attention (``F.scaled_dot_product_attention`` dispatches to the flash,
  memory-efficient or cuDNN kernels, whose backward has no derivative) and ``hardsigmoid`` (its
  ``hardsigmoid_backward`` has no derivative): the term's backward raises;
- **forward-over-reverse**: the tangent formulas of ``layer_norm`` and of train-mode ``batch_norm``
  treat the saved mean and variance as constants, so parameter gradients through them are wrong
  (tens of per cent in float64, no error); ``softmax`` raises an in-place error.

Two kinds of substitution are there for cost, not correctness: train-mode ``batch_norm``, whose double
backward PyTorch computes with a generic composite of about 80 kernels per layer, runs as
:func:`jacplug.engine.batch_norm.batch_norm`, whose double backward is a closed form of under 40;
convolutions run as :mod:`jacplug.engine.convolution`'s, whose double backward uses the
convolution's own backward kernels instead of convolutions of batch-transposed copies.

Each is a *substitution*: an equivalent formulation of the same function (same values, same first
derivatives) written with ops whose derivatives are complete. :func:`double_differentiable` and
:func:`forward_mode_safe` apply them inside a :class:`torch.overrides.TorchFunctionMode`, so they reach
every call site (``nn.LayerNorm``, timm's attention blocks, ``Tensor.softmax``) without touching the
model. Substitutions are registered plugins (hook ``register_op_substitutions``); the built-in ones
live here. Outside these contexts the model runs its usual, faster kernels.
"""

from __future__ import annotations

import contextlib
import functools
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.overrides import TorchFunctionMode

from . import convolution
from .batch_norm import batch_norm as closed_form_batch_norm

#: what a substitution is for: the exact (double backward) terms, the forward-mode terms, or both
DOUBLE_BACKWARD = "double_backward"
FORWARD_AD = "forward_ad"
PURPOSES = (DOUBLE_BACKWARD, FORWARD_AD)


@dataclass(frozen=True)
class Substitution:
    """Replace calls of every function in ``replaces`` by ``replacement`` (same signature) when
    running for one of ``purposes``. ``reason`` says why the original will not do: which derivative
    it lacks, or what it costs."""

    name: str
    replaces: tuple[Callable[..., Any], ...]
    replacement: Callable[..., Any]
    purposes: frozenset[str]
    reason: str


class SubstitutionMode(TorchFunctionMode):
    """Routes each call of a substituted function to its replacement; everything else runs as is.

    Inside ``__torch_function__`` the mode is inactive, so a replacement's own torch calls run the
    ordinary kernels (or, for nested substitutions such as attention's softmax, call them directly).
    """

    def __init__(self, table: Mapping[Callable[..., Any], Callable[..., Any]]) -> None:
        super().__init__()
        self.table = dict(table)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        replacement = self.table.get(func)
        if replacement is None:
            return func(*args, **(kwargs or {}))
        return replacement(*args, **(kwargs or {}))


# -- replacements --------------------------------------------------------------------------------


def hardsigmoid(input: Tensor, inplace: bool = False) -> Tensor:
    """``relu6(x + 3) / 6``: the values and the derivative (``1/6`` strictly inside ``(-3, 3)``) of
    ``F.hardsigmoid``, through ``hardtanh``, whose backward is differentiable. Always out of place:
    callers use the returned tensor, and an in-place write would break the graph being built."""
    return F.hardtanh(input + 3.0, 0.0, 6.0) / 6.0


def hardswish(input: Tensor, inplace: bool = False) -> Tensor:
    """``x * relu6(x + 3) / 6`` (``F.hardswish``), for forward mode only: its native backward is
    already differentiable, but its tangent goes through ``hardsigmoid``-style kernels."""
    return input * hardsigmoid(input)


def composite_softmax(input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None) -> Tensor:
    """``exp(x - max) / sum exp(x - max)``: every op has a complete forward-mode derivative (the
    fused ``softmax`` tangent formula raises an in-place error when back-propagated)."""
    x = input if dtype is None else input.to(dtype)
    if dim is None:
        dim = 0 if x.dim() in (0, 1, 3) else 1  # torch's legacy implicit-dim rule
    shifted = x - x.detach().amax(dim=dim, keepdim=True)
    e = shifted.exp()
    return e / e.sum(dim=dim, keepdim=True)


def composite_log_softmax(
    input: Tensor, dim: int | None = None, _stacklevel: int = 3, dtype: torch.dtype | None = None
) -> Tensor:
    """``(x - max) - log(sum exp(x - max))``, the log of :func:`composite_softmax` (``logsumexp``'s
    tangent has the same in-place defect)."""
    x = input if dtype is None else input.to(dtype)
    if dim is None:
        dim = 0 if x.dim() in (0, 1, 3) else 1
    shifted = x - x.detach().amax(dim=dim, keepdim=True)
    return shifted - shifted.exp().sum(dim=dim, keepdim=True).log()


def _attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    softmax: Callable[..., Tensor],
) -> Tensor:
    """``softmax(q k^T * scale + mask) v`` with ``F.scaled_dot_product_attention``'s arguments."""
    length, source = query.shape[-2], key.shape[-2]
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    if enable_gqa and key.shape[-3] != query.shape[-3]:
        repeat = query.shape[-3] // key.shape[-3]
        key, value = key.repeat_interleave(repeat, -3), value.repeat_interleave(repeat, -3)
    scores = (query * scale) @ key.transpose(-2, -1)
    if is_causal:
        keep = torch.ones(length, source, dtype=torch.bool, device=query.device).tril()
        scores = scores.masked_fill(~keep, float("-inf"))
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else scores + attn_mask
    weights = softmax(scores, -1)
    if dropout_p > 0:
        weights = F.dropout(weights, dropout_p)
    return weights @ value


#: attention from matmul and softmax, differentiable to any order (fused kernels are not)
math_attention = functools.partial(_attention, softmax=torch.softmax)
#: the same with :func:`composite_softmax`, for forward-over-reverse
forward_mode_attention = functools.partial(_attention, softmax=composite_softmax)


def composite_layer_norm(
    input: Tensor,
    normalized_shape: Sequence[int],
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    eps: float = 1e-5,
) -> Tensor:
    """``(x - mean) / sqrt(var + eps) * weight + bias`` over the last ``len(normalized_shape)``
    dimensions, from ops whose tangents keep the mean's and variance's dependence on ``x``."""
    dims = tuple(range(-len(tuple(normalized_shape)), 0))
    mean = input.mean(dim=dims, keepdim=True)
    var = (input - mean).pow(2).mean(dim=dims, keepdim=True)
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight
    return out + bias if bias is not None else out


def composite_batch_norm(
    input: Tensor,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    weight: Tensor | None = None,
    bias: Tensor | None = None,
    training: bool = False,
    momentum: float = 0.1,
    eps: float = 1e-5,
) -> Tensor:
    """``F.batch_norm`` from elementary ops when it normalises with the batch's statistics (train
    mode), whose native tangent formula drops their dependence on the inputs; running statistics are
    updated as the native kernel does. With running statistics (eval mode) the native kernel is exact."""
    if not training and running_mean is not None and running_var is not None:
        return F.batch_norm(input, running_mean, running_var, weight, bias, False, momentum, eps)
    dims = [0, *range(2, input.dim())]
    shape = [1, -1] + [1] * (input.dim() - 2)
    mean = input.mean(dim=dims, keepdim=True)
    var = (input - mean).pow(2).mean(dim=dims, keepdim=True)
    if training and running_mean is not None and running_var is not None:
        with torch.no_grad():
            count = input.numel() // input.shape[1]
            unbiased = var.detach().reshape(-1) * (count / max(count - 1, 1))
            running_mean.mul_(1 - momentum).add_(mean.detach().reshape(-1), alpha=momentum)
            running_var.mul_(1 - momentum).add_(unbiased, alpha=momentum)
    out = (input - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        out = out * weight.reshape(shape)
    return out + bias.reshape(shape) if bias is not None else out


_CONVOLUTION_REASON = (
    "PyTorch differentiates a convolution's backward with convolutions of batch-transposed copies (one per "
    "group); the convolution's own backward kernels do it"
)

BUILTIN_SUBSTITUTIONS: tuple[Substitution, ...] = (
    Substitution(
        "math-attention",
        (F.scaled_dot_product_attention,),
        math_attention,
        frozenset({DOUBLE_BACKWARD}),
        "fused attention kernels (flash, memory-efficient, cuDNN) have no double backward",
    ),
    Substitution(
        "forward-mode-attention",
        (F.scaled_dot_product_attention,),
        forward_mode_attention,
        frozenset({FORWARD_AD}),
        "fused attention has no forward-over-reverse derivative; the math form needs a composite softmax",
    ),
    Substitution(
        "batch-norm-double-backward",
        (F.batch_norm,),
        closed_form_batch_norm,
        frozenset({DOUBLE_BACKWARD}),
        "PyTorch's double backward of train-mode batch_norm is a generic composite of about 80 kernels; "
        "a closed form needs under 40",
    ),
    *(
        Substitution(f"{name}-double-backward", (native,), replacement, frozenset({DOUBLE_BACKWARD}), _CONVOLUTION_REASON)
        for name, native, replacement in (
            ("conv1d", F.conv1d, convolution.conv1d),
            ("conv2d", F.conv2d, convolution.conv2d),
            ("conv3d", F.conv3d, convolution.conv3d),
        )
    ),
    Substitution(
        "hardsigmoid",
        (F.hardsigmoid,),
        hardsigmoid,
        frozenset({DOUBLE_BACKWARD, FORWARD_AD}),
        "hardsigmoid_backward has no derivative",
    ),
    Substitution(
        "hardswish",
        (F.hardswish,),
        hardswish,
        frozenset({FORWARD_AD}),
        "written through hardsigmoid so the tangent's backward exists",
    ),
    Substitution(
        "softmax",
        (F.softmax, torch.softmax, Tensor.softmax),
        composite_softmax,
        frozenset({FORWARD_AD}),
        "the softmax tangent raises an in-place error when back-propagated",
    ),
    Substitution(
        "log-softmax",
        (F.log_softmax, torch.log_softmax, Tensor.log_softmax),
        composite_log_softmax,
        frozenset({FORWARD_AD}),
        "written like softmax, for the same reason",
    ),
    Substitution(
        "layer-norm",
        (F.layer_norm,),
        composite_layer_norm,
        frozenset({FORWARD_AD}),
        "the layer_norm tangent treats the saved mean and variance as constants: wrong parameter gradients",
    ),
    Substitution(
        "batch-norm",
        (F.batch_norm,),
        composite_batch_norm,
        frozenset({FORWARD_AD}),
        "the train-mode batch_norm tangent treats the batch statistics as constants: wrong parameter gradients",
    ),
)


def registered_substitutions() -> tuple[Substitution, ...]:
    """Every substitution registered through the plugin registry (built-ins and plugins)."""
    from ..registry import registry  # names live in the plugin registry, loaded lazily

    found = []
    for entry in registry("op_substitutions"):
        made = entry.factory()
        if not isinstance(made, Substitution):
            raise TypeError(f"op substitution {entry.name!r} from plugin {entry.plugin!r} must build a Substitution")
        found.append(made)
    return tuple(found)


def substitution_table(purpose: str, substitutions: Iterable[Substitution] | None = None) -> dict[Callable, Callable]:
    """Original function -> replacement for ``purpose`` (later substitutions win)."""
    if purpose not in PURPOSES:
        raise ValueError(f"purpose must be one of {PURPOSES}, got {purpose!r}")
    chosen = registered_substitutions() if substitutions is None else tuple(substitutions)
    table: dict[Callable, Callable] = {}
    for substitution in chosen:
        if purpose in substitution.purposes:
            table.update(dict.fromkeys(substitution.replaces, substitution.replacement))
    return table


@contextlib.contextmanager
def double_differentiable(substitutions: Iterable[Substitution] | None = None) -> Iterator[None]:
    """Run the enclosed forward pass so its backward can itself be differentiated.

    Use it around the *student's* forward when a loss back-propagates through ``J = ds/dx``
    (``jacplug.jacobian(..., create_graph=True)``): fused attention becomes the math form,
    ``hardsigmoid`` a ``hardtanh`` form. ``substitutions``: ``None`` for every registered one.
    """
    with SubstitutionMode(substitution_table(DOUBLE_BACKWARD, substitutions)):
        yield


@contextlib.contextmanager
def forward_mode_safe(substitutions: Iterable[Substitution] | None = None) -> Iterator[None]:
    """Run the enclosed forward pass so forward-mode tangents are right *and* differentiable
    w.r.t. the parameters (composite layer and batch norm, softmax and attention)."""
    with SubstitutionMode(substitution_table(FORWARD_AD, substitutions)):
        yield
