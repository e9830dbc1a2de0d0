"""One distillation step's forward: prepare exactly what the loss terms need, return each term.

Shared by the training loop, ``jacplug check`` and the DDP equivalence test, so all three build the
:class:`~jacplug.losses.DistillBatch` the same way:

- ``inputs`` require grad only when a term needs ``input_grad``; then the teacher runs with grad
  enabled w.r.t. the inputs (its parameters frozen, eval mode), so its graph reaches only the
  inputs and the Jacobian terms take the teacher rows without a graph. Otherwise the teacher runs
  under ``torch.no_grad()``.
- feature maps are captured with :class:`jacplug.FeatureTap` when ``loss.feature_layers`` is non-empty
  (token outputs of ViT-style models as ``[B, D, H, W]`` maps, :meth:`~jacplug.FeatureTap.maps`);
- ``student_fn``/``teacher_fn`` are handed over when a term asks for them;
- a teacher cache entry (logits ``[B, C]``, rows ``[B, R]``, Jacobian rows ``[B, R, *S]``) replaces
  the teacher's forward and backward when given.

Mixed precision: the models' forward passes run under ``runtime.autocast()`` (bf16 on CUDA), but
the logits are cast to float32 and the loss terms, Jacobians included, are evaluated outside
autocast, so the Jacobian rows and their normalisation are float32 computations. The extra
evaluations of forward-mode, finite-difference and noise terms run in full precision and leave
BatchNorm's running statistics alone (:func:`jacplug.losses.extra_evaluation`).
"""

from __future__ import annotations

import contextlib
from typing import Iterable

import torch
from torch import Tensor, nn

from ..engine.substitutions import DOUBLE_BACKWARD, Substitution, double_differentiable
from ..features import FeatureTap
from ..losses.base import DistillBatch, as_scalar
from ..losses.composite import WeightedLoss
from ..losses.evaluation import extra_evaluation
from .device import Runtime


def compute_terms(
    loss: WeightedLoss,
    student: nn.Module,
    teacher: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    runtime: Runtime,
    cached: dict[str, Tensor] | None = None,
    substitutions: Iterable[Substitution] | None = None,
) -> dict[str, Tensor]:
    """Each term's unweighted scalar value ``{key: Tensor []}``, on the student's graph.

    ``student`` may be DDP-wrapped (its forward then registers the gradient all-reduce);
    ``teacher`` must be frozen and in eval mode. ``inputs``: ``[B, *S]`` on the run's device;
    ``targets``: ``[B]``. ``cached``: teacher cache entries for this batch (see :mod:`.cache`).
    ``substitutions``: those the double-differentiable student forward applies (``None``: every
    registered one).
    """
    needs = loss.needs
    layers = loss.feature_layers
    input_grad = "input_grad" in needs
    x = inputs.detach().requires_grad_(input_grad)
    plain_student = getattr(student, "module", student)
    with contextlib.ExitStack() as stack:
        s_tap = stack.enter_context(FeatureTap(plain_student, list(layers))) if layers else None
        t_tap = stack.enter_context(FeatureTap(teacher, list(layers.values()), requires_grad=False)) if layers else None
        with runtime.autocast(), student_mode(loss, substitutions):
            student_logits = student(x).float()
        student_features = s_tap.maps() if s_tap else {}
        cache: dict[str, Tensor] = {}
        if cached is not None and not layers:
            teacher_logits = cached["teacher_logits"]
            cache = {k: v for k, v in cached.items() if k != "teacher_logits"}
        else:
            grad_mode = torch.enable_grad() if input_grad else torch.no_grad()
            with grad_mode, runtime.autocast():
                teacher_logits = teacher(x).float()
        teacher_features = t_tap.maps() if t_tap else {}
    batch = DistillBatch(
        inputs=x,
        student_logits=student_logits,
        teacher_logits=teacher_logits,
        targets=targets,
        student_fn=extra_evaluation(plain_student) if "student_fn" in needs else None,
        teacher_fn=extra_evaluation(teacher),
        student_features=student_features,
        teacher_features=teacher_features,
        cache=cache,
        logits_match_fns=runtime.amp_dtype is None,
    )
    return {key: as_scalar(term(batch), term) for key, term in loss.terms.items()}


def student_mode(loss: WeightedLoss, substitutions: Iterable[Substitution] | None = None
                 ) -> contextlib.AbstractContextManager:
    """How the student's forward must run for ``loss``: double-differentiable (fused attention and
    hard-sigmoid swapped for equivalent formulations, train-mode BatchNorm for one with a cheaper
    double backward) when a term back-propagates through its input Jacobian, else as is, with its fastest kernels. Forward-mode terms re-run the student themselves."""
    return double_differentiable(substitutions) if DOUBLE_BACKWARD in loss.higher_order else contextlib.nullcontext()


def weighted_total(loss: WeightedLoss, values: dict[str, Tensor]) -> Tensor:
    """``sum_i weight_i * term_i`` (the same sum :class:`WeightedLoss` computes)."""
    return torch.stack([loss.weights[key] * value for key, value in values.items()]).sum()


def with_every_parameter(total: Tensor, parameters: list[Tensor]) -> Tensor:
    """``total + 0 * sum(p[0])``: the same value and gradients, but every parameter is reached.

    Why: DistributedDataParallel all-reduces gradients in buckets and waits for every parameter's
    gradient; a loss whose terms miss some parameters (a Jacobian-only loss never reaches the
    classifier's bias, whose derivative w.r.t. the input is zero) would leave a bucket unreduced.
    One element per parameter (not ``p.sum()``, whose gradient is an expanded, zero-stride tensor that
    does not fit DDP's bucket layout). Used only under DDP.
    """
    return total + 0.0 * torch.stack([p.reshape(-1)[0] for p in parameters]).sum()
