"""The start-up probe: every loss term, with both models, on one tiny batch, before anything is trained.

Why: a student whose forward uses an op without the derivative a Jacobian term takes, an unknown
backend or feature layer, or a shape mismatch would otherwise fail only after the teacher phase
(minutes to hours). The probe runs :func:`~jacplug.pipeline.step.compute_terms` and the gradient-flow
report on a batch of eight training images with the models as built (the teacher's weights do not
matter for any of this), and for forward-mode terms compares the student's forward-mode parameter
gradients with reverse mode (:func:`jacplug.engine.diagnose.forward_mode_error`). It leaves no trace:
RNG state, BatchNorm running statistics and ``.grad`` fields are as before.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..engine.diagnose import forward_mode_error, missing_derivative, module_calling
from ..engine.substitutions import DOUBLE_BACKWARD, FORWARD_AD, double_differentiable
from ..errors import UserError
from ..graphcheck import TermFlow, flow_report
from ..losses.composite import WeightedLoss
from ..losses.evaluation import isolated_running_stats
from .data import DatasetSplits
from .device import Runtime
from .step import compute_terms

#: relative error of forward-mode parameter gradients above which forward mode is refused. The PyTorch
#: defects this guards against give 0.1 to 1; float32 rounding in eval mode gives about 1e-5 (a float64
#: check would be exact but costs minutes for depthwise convolutions on a CPU)
FORWARD_MODE_TOLERANCE = 1e-2

#: what works without the derivative a term lacks, for the refusal message
ALTERNATIVES = {
    DOUBLE_BACKWARD: "jacobian-direction:method=finite-difference or noisy-distill (no double backward)",
    FORWARD_AD: "jacobian-direction:method=finite-difference, jacobian-projected or noisy-distill",
}


def probe_batch(splits: DatasetSplits, device: torch.device, size: int = 8) -> tuple[Tensor, Tensor]:
    """The first ``size`` training images and labels (train-mode BatchNorm needs several)."""
    picks = range(min(size, len(splits.train)))
    inputs = torch.stack([splits.train[i][0] for i in picks]).to(device)
    targets = torch.tensor([int(splits.train[i][1]) for i in picks], device=device)
    return inputs, targets


def probe_terms(
    loss: WeightedLoss,
    student: nn.Module,
    teacher: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    runtime: Runtime,
    student_name: str,
) -> list[TermFlow]:
    """Each term's gradient-flow report on ``inputs``; raises a one-line :class:`UserError` when the
    student lacks a derivative some term needs, naming the op, the module and what works instead."""
    devices = [runtime.device] if runtime.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), isolated_running_stats(student):
        params = [p for p in list(student.parameters()) + list(loss.parameters()) if p.requires_grad]
        try:
            values = compute_terms(loss, student, teacher, inputs, targets, runtime)
            report = flow_report(values, params)
        except RuntimeError as error:
            op = missing_derivative(error)
            if op is None:
                raise
            raise _unsupported(loss, student, inputs, student_name, op, DOUBLE_BACKWARD) from error
        if FORWARD_AD in loss.higher_order:
            _check_forward_mode(loss, student, inputs, student_name)
    return report


def _check_forward_mode(loss: WeightedLoss, student: nn.Module, inputs: Tensor, student_name: str) -> None:
    try:
        with running_statistics(student), isolated_running_stats(student):
            error = forward_mode_error(student, inputs.float())
    except RuntimeError as exc:
        op = missing_derivative(exc)
        if op is None:
            raise UserError(
                f"student {student_name!r}: forward-mode Jacobian products fail ({' '.join(str(exc).split())[:160]}); "
                f"terms {_terms_needing(loss, FORWARD_AD)} need them; use {ALTERNATIVES[FORWARD_AD]} instead"
            ) from exc
        raise _unsupported(loss, student, inputs, student_name, op, FORWARD_AD) from exc
    if not error <= FORWARD_MODE_TOLERANCE:
        raise UserError(
            f"student {student_name!r}: forward-mode parameter gradients differ from reverse mode by {error:.1%} "
            f"(an op whose forward-over-reverse derivative is wrong in PyTorch and has no registered substitution); "
            f"terms {_terms_needing(loss, FORWARD_AD)} would train on them; use {ALTERNATIVES[FORWARD_AD]} instead"
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


def _unsupported(loss: WeightedLoss, student: nn.Module, inputs: Tensor, student_name: str, op: str,
                 purpose: str) -> UserError:
    def forward() -> None:
        with torch.no_grad(), double_differentiable():
            student(inputs)

    with isolated_running_stats(student):
        module = module_calling(student, forward, op)
    where = f" in module {module}" if module else ""
    return UserError(
        f"student {student_name!r} cannot run terms {_terms_needing(loss, purpose)}: {op} has no derivative"
        f"{where} and no op substitution covers it; use {ALTERNATIVES[purpose]} instead, or register an op "
        f"substitution (docs/jacobian.md)"
    )


def _terms_needing(loss: WeightedLoss, purpose: str) -> str:
    return ", ".join(key for key, term in loss.terms.items() if purpose in term.higher_order) or "(none)"
