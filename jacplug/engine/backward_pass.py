"""What a custom autograd Function's backward can learn about the backward pass running it.

PyTorch's own backward formulas know which of their outputs the running pass uses and whether it is
vmapped; a Python ``autograd.Function`` has to ask. Both questions go through private PyTorch
functions (the ones ``torch.autograd.graph.register_multi_grad_hook`` and ``vmap`` rely on), kept
here in one place; where they cannot answer, the answers are the safe ones.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor


def is_vmapped(t: Tensor) -> bool:
    """Whether ``t`` is a batched tensor of ``vmap`` or of ``autograd.grad(is_grads_batched=True)``,
    through which a custom Function's backward would not be recorded on the graph (``True`` where
    PyTorch cannot say: callers then take PyTorch's own derivative, always right)."""
    try:
        functorch = torch._C._functorch
        return bool(functorch.is_batchedtensor(t) or functorch.is_legacy_batchedtensor(t))
    except AttributeError:
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
