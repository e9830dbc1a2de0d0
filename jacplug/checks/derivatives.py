"""Find out, on one small batch, whether a model supports the derivatives a Jacobian term takes.

Two failure modes, both found before any training:

- an op with no derivative of its backward (``RuntimeError: derivative for aten::X is not
  implemented``) that no registered substitution covers: :func:`missing_derivative` reads the op from
  the error and :func:`module_calling` names the module whose forward dispatched it;
- forward-over-reverse that runs but is wrong (PyTorch's tangent formulas for some fused ops drop a
  dependence): :func:`forward_mode_error` compares the parameter gradient of ``w . (J u)`` from
  forward mode with the same gradient from reverse mode, where ``w . (J u) = (w^T J) . u`` is one VJP.
"""

from __future__ import annotations

import re
from typing import Callable

import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..engine.products import forward_products, reverse_products
from ..engine.substitutions import double_differentiable

_MISSING = re.compile(r"derivative for (aten::\w+)(?:\.\w+)? is not implemented")


def missing_derivative(error: BaseException) -> str | None:
    """``"aten::hardsigmoid_backward"`` from PyTorch's "derivative for ... is not implemented"
    error, or ``None`` for any other error."""
    match = _MISSING.search(str(error))
    return match.group(1) if match else None


class _OpRecorder(TorchDispatchMode):
    """Records, for each aten op dispatched, the innermost module running at the time."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.first: dict[str, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name  # "aten::hardsigmoid"
        self.first.setdefault(name, self.stack[-1] if self.stack else "")
        return func(*args, **(kwargs or {}))


def module_calling(model: nn.Module, run: Callable[[], object], op: str) -> str | None:
    """The qualified name and class of the module whose forward dispatches ``op`` (its ``_backward``
    suffix removed, since the backward op is what lacks a derivative), recorded while ``run()``
    executes ``model``'s forward; ``None`` if no module does."""
    forward_op = op[: -len("_backward")] if op.endswith("_backward") else op
    stack: list[str] = []
    handles = []
    def enter(label: str) -> Callable[..., None]:
        return lambda *_: stack.append(label)  # None: the module's inputs stay as they are

    def leave(*_: object) -> None:
        stack.pop()

    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(f"{name or '<root>'} ({type(module).__name__})")))
        handles.append(module.register_forward_hook(leave))
    recorder = _OpRecorder(stack)
    try:
        with recorder:
            run()
    finally:
        for handle in handles:
            handle.remove()
    for candidate in (forward_op, op):
        if candidate in recorder.first:
            return recorder.first[candidate]
    return None


def forward_mode_error(model: nn.Module, inputs: Tensor, seed: int = 0) -> float:
    """Relative error of the parameter gradient of ``w . (J u)`` computed by forward mode (as the
    forward-mode terms compute it), against reverse mode, for random ``u`` and ``w``.

    ``model`` runs as it is (train or eval mode); its running statistics may move, so callers wrap
    it in :func:`jacplug.losses.isolated_running_stats`. A parameter one mode does not reach
    counts as a zero gradient there.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    generator = torch.Generator(device=inputs.device).manual_seed(seed)
    x = inputs.detach()
    u = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    devices = [x.device] if x.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # both passes draw the same dropout masks
        torch.manual_seed(seed)
        tangent = forward_products(model, x, u.unsqueeze(1), create_graph=True)[:, 0]
        torch.manual_seed(seed)
        xr = x.clone().requires_grad_(True)
        with double_differentiable():
            outputs = model(xr)
    w = torch.randn(tangent.shape, generator=generator, device=x.device, dtype=tangent.dtype)
    forward = torch.autograd.grad((tangent * w).sum(), params, allow_unused=True)
    row = reverse_products(outputs, xr, w.unsqueeze(1).to(outputs.dtype), create_graph=True)[:, 0]
    reverse = torch.autograd.grad((row * u).sum(), params, allow_unused=True)
    pairs = [
        (torch.zeros_like(p) if a is None else a, torch.zeros_like(p) if b is None else b)
        for p, a, b in zip(params, forward, reverse)
        if a is not None or b is not None
    ]
    if not pairs:
        return 0.0
    diff = torch.sqrt(sum((a.double() - b.double()).pow(2).sum() for a, b in pairs))
    scale = torch.sqrt(sum(b.double().pow(2).sum() for _, b in pairs))
    return float(diff / scale.clamp_min(1e-30))
