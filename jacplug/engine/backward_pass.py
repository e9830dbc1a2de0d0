"""What a custom autograd Function can learn about the backward pass and the autocast state around it.

PyTorch's own backward formulas know which of their outputs the running pass uses and whether it is
vmapped; a Python ``autograd.Function`` has to ask. Both questions go through private PyTorch
functions (the ones ``torch.autograd.graph.register_multi_grad_hook`` and ``vmap`` rely on), and the
autocast query changed its signature across releases; all are kept here in one place, each with a
fallback for the oldest supported torch, and where none can answer, the answers are the safe ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def is_vmapped(t: Tensor) -> bool:
    """Whether ``t`` is a batched tensor of ``vmap`` or of ``autograd.grad(is_grads_batched=True)``,
    through which a custom Function's backward would not be recorded on the graph (``True`` where
    PyTorch cannot say: callers then take PyTorch's own derivative, always right).

    Version-safe: ``torch._C._functorch.is_legacy_batchedtensor`` is newer than torch 2.2; there the
    legacy batched tensors of ``is_grads_batched`` are told by their ``Batched`` dispatch key, so the
    cheaper double backwards keep running instead of silently never running."""
    try:
        functorch = torch._C._functorch
        if functorch.is_batchedtensor(t):
            return True
        legacy = getattr(functorch, "is_legacy_batchedtensor", None)
        if legacy is not None:
            return bool(legacy(t))
        return "Batched" in str(torch._C._dispatch_keys(t))
    except (AttributeError, RuntimeError, TypeError):
        return True


def will_use_gradient(ctx: Any, index: int) -> bool:
    """Whether the running backward pass uses the gradient of input ``index`` of ``ctx``'s node.

    Answered for inputs that are outputs of other nodes (a leaf's accumulation node cannot be asked
    about inside ``autograd.grad``; give a leaf a view to make it askable); otherwise ``True``."""
    node = ctx.next_functions[index][0]
    if node is None:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):
        return True


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts to on ``device_type`` (``"cpu"``, ``"cuda"``) now, or ``None`` when off.

    Version-safe: ``torch.is_autocast_enabled(device_type)`` and ``torch.get_autocast_dtype`` are newer
    than torch 2.2, whose per-device functions (``is_autocast_cpu_enabled``, ``get_autocast_gpu_dtype``)
    answer there instead."""
    try:
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    except (TypeError, AttributeError):  # torch < 2.4: no device argument
        if device_type == "cpu":
            return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
        if device_type == "cuda":
            return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None
        return None
