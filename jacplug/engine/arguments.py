"""Argument checks shared by the Jacobian entry points.

Why a module of its own: every backend must refuse the same mistakes with the same words (hand-written
Jacobian losses fail silently, see docs/autograd-explained.md; ours must say what is wrong and what
would be right).
"""

from __future__ import annotations

import contextlib

from typing import Callable

import torch
from torch import Tensor

from ..errors import UserError


class JacobianArgumentError(UserError, ValueError):
    """Inputs, outputs, rows or vectors that cannot describe a per-sample Jacobian."""


def check_inputs(inputs: Tensor) -> None:
    if not isinstance(inputs, Tensor):
        raise JacobianArgumentError(f"inputs must be a tensor [B, *S], got {type(inputs).__name__}")
    if inputs.dim() < 2:
        raise JacobianArgumentError(
            f"inputs must have a batch dimension and at least one more, [B, *S]; got shape {tuple(inputs.shape)}"
        )
    if not inputs.is_floating_point():
        raise JacobianArgumentError(f"inputs must be floating point to differentiate, got {inputs.dtype}")


def check_outputs(outputs: Tensor, inputs: Tensor) -> None:
    """Outputs must be ``[B, C]`` logits with a graph reaching ``inputs``."""
    if not isinstance(outputs, Tensor):
        raise JacobianArgumentError(f"outputs must be a tensor [B, C] or a callable, got {type(outputs).__name__}")
    if outputs.dim() != 2 or outputs.shape[0] != inputs.shape[0]:
        raise JacobianArgumentError(
            f"outputs must be [B, C] with B = {inputs.shape[0]} (the inputs' batch size); got shape "
            f"{tuple(outputs.shape)}; flatten extra output dimensions first"
        )
    if not inputs.requires_grad:
        raise JacobianArgumentError(
            "inputs do not require grad, so no input Jacobian can be taken: call inputs.requires_grad_() "
            "BEFORE the forward pass that computes outputs (or pass the model as a callable instead of its outputs)"
        )
    if outputs.grad_fn is None:
        raise JacobianArgumentError(
            "outputs carry no autograd graph (computed under torch.no_grad()/inference_mode, or detached); "
            "compute them with grad enabled from inputs that require grad"
        )


def check_rows(rows: Tensor | None, batch: int, classes: int, device: torch.device) -> Tensor:
    """Normalise ``rows`` to a LongTensor ``[B, R]``; ``None`` means all ``C`` rows."""
    if rows is None:
        return torch.arange(classes, device=device).expand(batch, classes)
    if not isinstance(rows, Tensor) or rows.dtype not in (torch.int64, torch.int32):
        raise JacobianArgumentError(
            f"rows must be None or an integer tensor [B] or [B, R] of class indices, got "
            f"{rows.dtype if isinstance(rows, Tensor) else type(rows).__name__}"
        )
    if rows.dim() == 1:
        rows = rows.unsqueeze(1)
    if rows.dim() != 2 or rows.shape[0] != batch:
        raise JacobianArgumentError(f"rows must be [B] or [B, R] with B = {batch}; got shape {tuple(rows.shape)}")
    if rows.numel() and not capturing(rows) and (int(rows.min()) < 0 or int(rows.max()) >= classes):
        raise JacobianArgumentError(
            f"rows hold class indices in [{int(rows.min())}, {int(rows.max())}] but outputs have C = {classes} classes"
        )
    return rows.to(device=device, dtype=torch.long)


def capturing(tensor: Tensor) -> bool:
    """True while a CUDA graph is being captured on the current stream: checks that read values
    back to the host (and so synchronise) must be skipped then; they ran on the eager warm-up steps."""
    return tensor.is_cuda and torch.cuda.is_current_stream_capturing()


def check_output_vectors(v: Tensor, outputs: Tensor) -> Tensor:
    """``v`` ``[B, C]`` or ``[B, k, C]`` -> ``[B, k, C]`` in the outputs' dtype."""
    b, c = outputs.shape
    if v.dim() == 2:
        v = v.unsqueeze(1)
    if v.dim() != 3 or v.shape[0] != b or v.shape[2] != c:
        raise JacobianArgumentError(
            f"output vectors v must be [B, C] or [B, k, C] with B = {b}, C = {c}; got shape {tuple(v.shape)}"
        )
    return v.to(dtype=outputs.dtype)


def check_input_directions(u: Tensor, inputs: Tensor) -> Tensor:
    """``u`` ``[B, *S]`` or ``[B, k, *S]`` -> ``[B, k, *S]``."""
    if u.shape == inputs.shape:
        return u.unsqueeze(1)
    if u.dim() == inputs.dim() + 1 and u.shape[0] == inputs.shape[0] and u.shape[2:] == inputs.shape[1:]:
        return u
    raise JacobianArgumentError(
        f"input directions u must be [B, *S] = {tuple(inputs.shape)} or [B, k, *S]; got shape {tuple(u.shape)}"
    )


def evaluate(f: Callable[[Tensor], Tensor], inputs: Tensor, *, create_graph: bool) -> tuple[Tensor, Tensor]:
    """Run a callable on inputs that require grad, returning ``(outputs, inputs_used)``; with
    ``create_graph`` the forward runs :func:`~jacplug.engine.substitutions.double_differentiable`,
    because the Jacobian taken from it will be differentiated again."""
    from .substitutions import double_differentiable

    x = inputs if inputs.requires_grad else inputs.detach().requires_grad_(True)
    with torch.enable_grad(), double_differentiable() if create_graph else contextlib.nullcontext():
        outputs = f(x)
    check_outputs(outputs, x)
    return outputs, x
