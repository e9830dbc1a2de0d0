"""What a model returns, read as logits ``[B, C]`` in a precision the loss terms can trust.

Why one place: the training step, the extra evaluations of forward-mode, finite-difference and noise
terms, and the teacher cache all read model outputs. Models from other libraries do not all return a
tensor: Hugging Face models return a ``ModelOutput`` whose ``.logits`` is the tensor, some code
returns ``{"logits": ...}``.

Precision: under bf16 autocast the logits come out in bfloat16; the loss terms (Jacobian rows and
their normalisation included) must run in at least float32, so lower precisions are cast up. A
float64 model keeps float64: casting it down to float32 would round the terms of a float64 check
to about 1e-8.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from .errors import UserError


def logits_of(output: Any, role: str = "model") -> Tensor:
    """The logits tensor of ``output``: the tensor itself, its ``.logits`` attribute (Hugging Face
    ``ModelOutput``), or its ``"logits"`` entry; anything else is a one-line :class:`UserError`."""
    if isinstance(output, Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, Tensor):
        return logits
    raise UserError(
        f"the {role}'s forward returned a {type(output).__name__}, not logits: return a [B, C] tensor, "
        f"an object with .logits (a Hugging Face ModelOutput) or a mapping with a 'logits' entry"
    )


def at_least_float32(tensor: Tensor) -> Tensor:
    """``tensor`` in float32 when its dtype is narrower (bf16, fp16), else unchanged (float32, float64)."""
    if tensor.is_floating_point() and torch.finfo(tensor.dtype).bits < 32:
        return tensor.float()
    return tensor


class Logits(nn.Module):
    """``model`` as a module whose forward returns :func:`logits_of` its output: for code that calls a
    model as a function of its input (forward-mode products under ``torch.func``), which needs a tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return logits_of(self.model(x))
