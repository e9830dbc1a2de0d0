"""The two vector-product primitives every backend is built from.

``vjp``: ``v^T J`` per sample by one reverse pass (needs the outputs' graph).
``jvp``: ``J u`` per sample by forward-mode AD or finite differences (needs the function itself,
because both re-evaluate it).

Per-sample semantics: with outputs ``[B, C]`` and inputs ``[B, *S]``, one reverse pass with
``v = [v_1..v_B]`` returns ``sum_b' v_b'^T d out[b'] / d x[b]`` for each ``b``: the per-sample
``v_b^T J_b`` whenever samples do not interact. A train-mode BatchNorm makes them interact; then the
reverse result is that column sum and forward mode's ``J u`` is the row sum
``sum_b' d out[b] / d x[b'] u_b'``. Keep models in eval mode where the exact per-sample Jacobian matters.
"""

from __future__ import annotations

import contextlib
import warnings
from typing import Callable

import torch
import torch.autograd.forward_ad as fwAD
from torch import Tensor

from .arguments import JacobianArgumentError


def reverse_products(
    outputs: Tensor,
    inputs: Tensor,
    vectors: Tensor,
    *,
    create_graph: bool,
    retain_graph: bool | None = None,
    batched: bool = False,
) -> Tensor:
    """``vectors`` ``[B, k, C]`` -> ``[B, k, *S]``, one VJP per ``k`` (or one batched VJP).

    ``retain_graph`` defaults to ``create_graph``: the teacher's graph (``create_graph=False``) is
    freed after the last product, the student's is kept for the loss's backward.
    """
    keep = create_graph if retain_graph is None else retain_graph
    k = vectors.shape[1]
    if batched and k > 1:
        (grads,) = torch.autograd.grad(
            outputs,
            inputs,
            vectors.movedim(1, 0),
            create_graph=create_graph,
            retain_graph=keep,
            is_grads_batched=True,
            allow_unused=True,
        )
        _check_used(grads)
        return grads.movedim(0, 1)
    products = []
    for i in range(k):
        (grad,) = torch.autograd.grad(
            outputs,
            inputs,
            vectors[:, i],
            create_graph=create_graph,
            retain_graph=keep or i < k - 1,
            allow_unused=True,
        )
        _check_used(grad)
        products.append(grad)
    return torch.stack(products, dim=1)


def _check_used(grad: Tensor | None) -> None:
    if grad is None:
        raise JacobianArgumentError(
            "outputs do not depend on inputs (autograd found no path); make sure the model consumes the very "
            "tensor passed as inputs, not a copy made before requires_grad_()"
        )


def forward_products(f: Callable[[Tensor], Tensor], inputs: Tensor, directions: Tensor, *, create_graph: bool) -> Tensor:
    """``directions`` ``[B, k, *S]`` -> ``[B, k, C]`` by forward-mode AD, one forward pass per ``k``.

    Uses ``torch.autograd.forward_ad`` rather than ``torch.func.jvp`` because its tangents are
    ordinary autograd tensors: with ``create_graph=True`` they are differentiable w.r.t. the model's
    parameters, and modules with buffers (train-mode BatchNorm) and in-place ops work unchanged.

    PyTorch's own tangent formulas for ``layer_norm``, train-mode ``batch_norm`` and ``softmax`` give
    the right ``J u`` but wrong (or failing) parameter gradients of it, so ``f`` runs under
    :func:`~jacplug.engine.substitutions.forward_mode_safe`, and outside autocast: a tangent rounded
    to bf16 is not worth differentiating (the model runs in its parameters' precision).
    """
    from .substitutions import forward_mode_safe

    x = inputs.detach()
    products = []
    for i in range(directions.shape[1]):
        with fwAD.dual_level(), torch.set_grad_enabled(create_graph), full_precision(x), forward_mode_safe():
            with warnings.catch_warnings():  # torch's first make_dual scripts decompositions and warns about it
                warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.* is deprecated", category=FutureWarning)
                dual = fwAD.make_dual(x, directions[:, i].to(x.dtype))
            out = f(dual)
            primal, tangent = fwAD.unpack_dual(out)
        if tangent is None:
            raise JacobianArgumentError("outputs do not depend on inputs (forward mode produced no tangent)")
        products.append(tangent if create_graph else tangent.detach())
    return torch.stack(products, dim=1)


def full_precision(inputs: Tensor) -> contextlib.AbstractContextManager:
    """Autocast off on ``inputs``' device: the extra evaluations of forward mode and finite
    differences need the model's full precision (a bf16 difference of nearby outputs is noise)."""
    return torch.autocast(inputs.device.type, enabled=False)


def default_step(dtype: torch.dtype, scheme: str) -> float:
    """Relative finite-difference step: ``eps**(1/2)`` for forward differences, ``eps**(1/3)`` for
    central ones (the usual balance of truncation against rounding error). float32: 3.5e-4 / 4.9e-3;
    float64: 1.5e-8 / 6.1e-6."""
    eps = torch.finfo(dtype).eps
    return eps ** 0.5 if scheme == "forward" else eps ** (1.0 / 3.0)


def finite_difference_products(
    f: Callable[[Tensor], Tensor],
    inputs: Tensor,
    directions: Tensor,
    *,
    create_graph: bool,
    step: float | None = None,
    scheme: str = "central",
    outputs: Tensor | None = None,
) -> Tensor:
    """``directions`` ``[B, k, *S]`` -> ``[B, k, C]`` by finite differences of ``f``.

    The step for sample ``b`` is ``h * max(1, max|x_b|) / max|u_b|`` with ``h`` from
    :func:`default_step`, so it scales with the input's magnitude and the direction's length.
    ``scheme="forward"`` costs one extra evaluation per direction and reuses ``outputs = f(inputs)``
    when given (the training step has computed it already); ``"central"`` costs two and is accurate
    to second order. Gradients flow to ``f``'s parameters when ``create_graph=True``. ``f`` runs
    outside autocast (:func:`full_precision`); ``outputs`` must then be full-precision too.
    """
    if scheme not in ("forward", "central"):
        raise JacobianArgumentError(f"finite-difference scheme must be 'forward' or 'central', got {scheme!r}")
    x = inputs.detach()
    if x.dtype in (torch.float16, torch.bfloat16):
        raise JacobianArgumentError(
            f"finite differences in {x.dtype} lose most digits of J u; pass float32 inputs (and a float32 model)"
        )
    h = default_step(x.dtype, scheme) if step is None else float(step)
    if not h > 0:
        raise JacobianArgumentError(f"finite-difference step must be > 0, got {h}")
    view = (-1,) + (1,) * (x.dim() - 1)
    scale = x.flatten(1).abs().amax(1).clamp_min(1.0)
    products = []
    with torch.set_grad_enabled(create_graph), full_precision(x):
        base = None
        if scheme == "forward":
            base = outputs if outputs is not None else f(x)
        for i in range(directions.shape[1]):
            u = directions[:, i].to(x.dtype)
            steps = h * scale / u.flatten(1).abs().amax(1).clamp_min(torch.finfo(x.dtype).tiny)
            hu = steps.view(view) * u
            if scheme == "forward":
                diff = f(x + hu) - base
                products.append(diff / steps.view(-1, 1))
            else:
                diff = f(x + hu) - f(x - hu)
                products.append(diff / (2 * steps.view(-1, 1)))
    result = torch.stack(products, dim=1)
    return result if create_graph else result.detach()


def basis_directions(inputs: Tensor, start: int, stop: int) -> Tensor:
    """Unit directions ``e_start .. e_{stop-1}`` over the flattened input, the same for every
    sample: ``[B, stop - start, *S]``; used to assemble full Jacobians column by column."""
    b, d = inputs.shape[0], inputs[0].numel()
    eye = torch.zeros(stop - start, d, dtype=inputs.dtype, device=inputs.device)
    eye[torch.arange(stop - start), torch.arange(start, stop)] = 1
    return eye.view(1, stop - start, *inputs.shape[1:]).expand(b, -1, *inputs.shape[1:])
