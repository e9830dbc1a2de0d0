"""The teacher a :class:`jacplug.Distiller` distils from, in its custody: :class:`FrozenTeacher`.

Why it is kept out of the Distiller's module tree: ``parameters()``, ``state_dict()``, an optimizer, an EMA
copy and a ``DistributedDataParallel`` around the Distiller must see only what is trained (the student and
the loss terms' adapters); a registered teacher would be saved in every checkpoint, copied by the EMA and
wait in DDP's all-reduce for gradients it never gets. Why eval mode whatever ``train()`` says: train-mode
BatchNorm would couple the samples' Jacobian rows and move the teacher's running statistics.

As timm's ``DistillationTeacher`` (``timm/task/distillation.py``) holds the teacher's own normalisation, this
holds the view of the student's input the teacher takes (another normalisation, a channel adapter): a
differentiable map applied inside the step, so the teacher's Jacobian is taken w.r.t. the student's input,
chain rule included. The view is part of the frozen function: frozen, in eval mode and moved with it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from .errors import UserError
from .outputs import at_least_float32, logits_of
from .precision import forward_autocast

View = Callable[[Tensor], Tensor]


class FrozenTeacher:
    """``teacher(x)``: the frozen ``model``'s output for the student's input ``x`` (through ``view`` if given).

    ``model`` is put in eval mode with ``requires_grad_(False)`` here, once; :meth:`keep_eval` puts it back
    after a caller's ``train()``; :meth:`apply` moves it (and the view) with the Distiller's ``.to()``."""

    def __init__(self, model: nn.Module, view: View | None = None) -> None:
        if view is not None and not callable(view):  # before the model is touched
            raise UserError(f"teacher_input must be a callable (a function or nn.Module mapping the student's input "
                            f"to the teacher's), got {type(view).__name__}")
        self.model = model
        self.view = view
        for module in self.modules():
            module.eval().requires_grad_(False)

    def __call__(self, x: Tensor) -> Any:
        return self.model(self.input(x))

    def logits(self, x: Tensor, autocast: torch.dtype | None) -> Tensor:
        """The teacher's logits ``[B, C]`` (at least float32) for the student's batch ``x``, the forward under
        ``autocast`` (:mod:`jacplug.precision`). With grad only when ``x`` requires it: a term then takes the
        teacher's Jacobian rows, which need the graph to the inputs, never to the frozen weights."""
        with torch.set_grad_enabled(x.requires_grad), forward_autocast(autocast, x.device):
            return at_least_float32(logits_of(self(x), "teacher"))

    def input(self, x: Tensor) -> Tensor:
        """The teacher's input for the student's input ``x``."""
        return x if self.view is None else self.view(x)

    def modules(self) -> list[nn.Module]:
        """The model and, when it is a module, the view."""
        return [self.model, *([self.view] if isinstance(self.view, nn.Module) else [])]

    def keep_eval(self) -> None:
        for module in self.modules():
            if module.training:
                module.eval()

    def apply(self, fn: Callable, *args: Any, **kwargs: Any) -> None:
        """``nn.Module._apply`` on the model and the view: what ``.to()``, ``.cuda()``, ``.double()`` do."""
        for module in self.modules():
            module._apply(fn, *args, **kwargs)
