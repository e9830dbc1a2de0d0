"""Before the first update: does every loss term train the student, and can the student be differentiated
as the terms need?

Two failures are silent or late without these checks:

- a term with no autograd path to the parameters (a Jacobian taken without ``create_graph=True``, a
  detached feature) trains nothing while the run looks healthy (:mod:`jacplug.checks.gradient_flow`);
- an op without the derivative a term takes (fused attention or hard-sigmoid outside
  :func:`jacplug.double_differentiable`, a custom op) fails in the first backward with PyTorch's
  "derivative for aten::X is not implemented", which names neither the module nor a way out;
  forward-mode products through an op whose forward-over-reverse derivative PyTorch gets wrong
  train on a wrong gradient without any error.

:func:`flow_of_terms` and :func:`check_forward_mode` turn both into one line naming the op, the
module, the terms that need it and the terms that would work. :class:`jacplug.Distiller` runs them on its
first call (:func:`checked_terms`); ``jacplug train`` and ``jacplug check`` run them through
:meth:`jacplug.Distiller.check` (:func:`probe_terms`) before anything is trained.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..engine.substitutions import DOUBLE_BACKWARD, FORWARD_AD, double_differentiable
from ..errors import UserError
from ..losses.composite import WeightedLoss
from ..losses.extra_evaluation import isolated_running_stats
from ..outputs import Logits
from .derivatives import forward_mode_error, missing_derivative, module_calling
from .gradient_flow import TermFlow, flow_report, gradient_flow, raise_for_detached

#: relative error of forward-mode parameter gradients above which forward mode is refused. The PyTorch
#: defects this guards against give 0.1 to 1; float32 rounding in eval mode gives about 1e-5 (a float64
#: check would be exact but costs minutes for depthwise convolutions on a CPU)
FORWARD_MODE_TOLERANCE = 1e-2

#: what works without the derivative a term lacks, for the refusal message
ALTERNATIVES = {
    DOUBLE_BACKWARD: "jacobian-direction:method=finite-difference or noisy-distill (no double backward)",
    FORWARD_AD: "jacobian-direction:method=finite-difference, jacobian-projected or noisy-distill",
}


def flow_of_terms(compute: Callable[[], Mapping[str, Tensor]], parameters: Sequence[Tensor], loss: WeightedLoss,
                  student: nn.Module, inputs: Tensor, student_name: str) -> tuple[dict[str, Tensor], list[TermFlow]]:
    """``compute()`` (each term's value) and each term's gradient-flow report w.r.t. ``parameters``.

    An op without the derivative the terms take, met in ``compute`` or while differentiating the terms,
    becomes a one-line :class:`UserError` (see :func:`unsupported`); other errors pass through.
    """
    try:
        values = dict(compute())
        return values, flow_report(values, parameters)
    except RuntimeError as error:
        op = missing_derivative(error)
        if op is None:
            raise
        raise unsupported(loss, student, inputs, student_name, op, DOUBLE_BACKWARD) from error


def checked_terms(compute: Callable[[], Mapping[str, Tensor]], parameters: Sequence[Tensor], loss: WeightedLoss,
                  student: nn.Module, inputs: Tensor, student_name: str) -> dict[str, Tensor]:
    """``compute()`` (each term's value on the graph), proven before the first update: an op without the
    derivative a term takes and a term that reaches none of its parameters raise in one line, zero or
    non-finite gradients warn (:func:`~jacplug.checks.gradient_flow.gradient_flow`), forward mode is
    checked against reverse mode (:func:`check_forward_mode`)."""
    values, report = flow_of_terms(compute, parameters, loss, student, inputs, student_name)
    raise_for_detached(report)
    gradient_flow(values, parameters)
    check_forward_mode(loss, student, inputs, student_name)
    return values


def probe_terms(compute: Callable[[], Mapping[str, Tensor]], parameters: Sequence[Tensor], loss: WeightedLoss,
                student: nn.Module, inputs: Tensor, student_name: str) -> list[TermFlow]:
    """Each term's gradient-flow report, with the checks of :func:`checked_terms` that raise; a detached
    term is reported, not raised. Leaves no trace: RNG state and running statistics are as before."""
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), isolated_running_stats(student):
        _, report = flow_of_terms(compute, parameters, loss, student, inputs, student_name)
        check_forward_mode(loss, student, inputs, student_name)
    return report


def check_forward_mode(loss: WeightedLoss, student: nn.Module, inputs: Tensor, student_name: str) -> None:
    """When a term takes forward-mode products of the student, refuse (one line) a student whose
    forward-mode parameter gradients are missing or differ from reverse mode's. Leaves no trace:
    RNG state and running statistics are as before."""
    if FORWARD_AD not in loss.higher_order:
        return
    devices = [inputs.device] if inputs.device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices), running_statistics(student), isolated_running_stats(student):
            error = forward_mode_error(Logits(student), inputs if inputs.dtype == torch.float64 else inputs.float())
    except RuntimeError as exc:
        op = missing_derivative(exc)
        if op is None:
            raise UserError(
                f"student {student_name!r}: forward-mode Jacobian products fail ({' '.join(str(exc).split())[:160]}); "
                f"terms {terms_needing(loss, FORWARD_AD)} need them; use {ALTERNATIVES[FORWARD_AD]} instead"
            ) from exc
        raise unsupported(loss, student, inputs, student_name, op, FORWARD_AD) from exc
    if not error <= FORWARD_MODE_TOLERANCE:
        raise UserError(
            f"student {student_name!r}: forward-mode parameter gradients differ from reverse mode by {error:.1%} "
            f"(an op whose forward-over-reverse derivative is wrong in PyTorch and has no registered substitution); "
            f"terms {terms_needing(loss, FORWARD_AD)} would train on them; use {ALTERNATIVES[FORWARD_AD]} instead"
        )


@contextlib.contextmanager
def running_statistics(model: nn.Module) -> Iterator[None]:
    """BatchNorm layers normalise with their running statistics inside; their modes are restored on exit.

    Why the forward-mode check needs it: train-mode BatchNorm over a few images of small feature maps
    amplifies float32 rounding to several per cent in both modes' gradients (timm's resnet10t at 32 px:
    2 %), which would hide a real defect or invent one; with running statistics the network is well
    conditioned (1e-5). Only BatchNorm changes: other modules keep their train-mode behaviour (some
    cache tensors in eval mode). Train-mode batch statistics are covered by the batch-norm
    substitution, whose parameter gradients are tested against full reverse-mode Jacobians in float64."""
    norms = [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats and m.training]
    for module in norms:
        module.training = False
    try:
        yield
    finally:
        for module in norms:
            module.training = True


def unsupported(loss: WeightedLoss, student: nn.Module, inputs: Tensor, student_name: str, op: str,
                purpose: str) -> UserError:
    """The one-line refusal for ``op``, which lacks the derivative ``purpose`` needs: the op, the module
    whose forward dispatches it, the terms that need it and what works instead."""

    def forward() -> None:
        with torch.no_grad(), double_differentiable():
            student(inputs)

    with isolated_running_stats(student):
        module = module_calling(student, forward, op)
    where = f" in module {module}" if module else ""
    return UserError(
        f"student {student_name!r} cannot run terms {terms_needing(loss, purpose)}: {op} has no derivative"
        f"{where} and no op substitution covers it; use {ALTERNATIVES[purpose]} instead, or register an op "
        f"substitution (docs/jacobian.md)"
    )


def terms_needing(loss: WeightedLoss, purpose: str) -> str:
    return ", ".join(key for key, term in loss.terms.items() if purpose in term.higher_order) or "(none)"
