"""Jacobian-matching terms: match ``J_S = ds/dx`` to ``J_T = dt/dx`` (per sample, ``[B, C, *S]``).

- ``jacobian`` (Eq. 10 of Srinivas & Fleuret, the default): selected rows, unit-normalised;
- ``jacobian-projected``: all classes through random output projections ``v^T J`` (VJPs);
- ``jacobian-direction``: all of ``J`` through random input directions ``J u`` (JVPs);
- ``noisy-distill``: output matching on noisy inputs, which equals Jacobian matching to first order.

Caller contract for terms that need ``input_grad``: ``inputs`` require grad, ``student_logits`` are
computed from them, and ``teacher_logits`` are computed with grad enabled w.r.t. ``inputs`` (teacher
parameters frozen). Teacher rows are computed without a graph and cached in ``batch.cache``; see
:mod:`jacplug.losses.teacher_rows` for the keys. In train mode, BatchNorm couples the samples of a batch,
so the student's "per-sample" rows are the batched VJP's rows (the sum over the batch column), which
is what double-backprop code gets too; keep the teacher in eval mode.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..engine import jacobian, jvp, resolve_backend, vjp
from ..engine.substitutions import DOUBLE_BACKWARD, FORWARD_AD
from ..errors import UserError
from .base import DistillBatch, LossTerm, require
from .values import boolean, choice, positive_float, positive_int
from .teacher_rows import teacher_jacobian_rows, teacher_vjp

CLASS_CHOICES = ("top1", "label", "topk", "all")
JVP_METHODS = ("forward", "finite-difference")
FD_SCHEMES = ("forward", "central")


def unit_rows(rows: Tensor, eps: float) -> Tensor:
    """``[B, R, *S]`` -> ``[B, R, N]`` with each row divided by ``max(||row||_2, eps)`` over the
    flattened input, so a zero row (a dead or saturated network) maps to zero instead of NaN."""
    flat = rows.flatten(2)
    return flat / torch.linalg.vector_norm(flat, dim=-1, keepdim=True).clamp_min(eps)


def row_distance(student: Tensor, teacher: Tensor, *, normalize: bool, squared: bool, eps: float) -> Tensor:
    """Per-row distance ``[B, R]`` between ``[B, R, *S]`` row stacks, optionally unit-normalised."""
    if normalize:
        diff = unit_rows(student, eps) - unit_rows(teacher, eps)
    else:
        diff = (student - teacher).flatten(2)
    return diff.pow(2).sum(-1) if squared else torch.linalg.vector_norm(diff, dim=-1)


def _check_input_grad(batch: DistillBatch, term: LossTerm) -> None:
    if not batch.inputs.requires_grad or batch.student_logits.grad_fn is None:
        raise ValueError(
            f"loss term {term.name!r} needs input Jacobians: call inputs.requires_grad_(True) BEFORE the student's "
            f"forward pass and compute student_logits from those inputs with grad enabled"
        )


class JacobianLoss(LossTerm):
    """Eq. 10 style Jacobian matching, the default Jacobian term.

    For each sample ``b`` and selected class ``i`` (the same for both networks):
    ``d = || n(J_T[b, i]) - n(J_S[b, i]) ||_2`` (``squared=True``: ``d^2``), where ``n`` is unit
    L2 normalisation over the flattened input (``max(norm, eps)`` guards zero rows); returns the mean
    of ``d`` over the batch and the selected rows.

    ``classes``: ``"top1"`` (default) the teacher's argmax; ``"label"`` the ground truth ``targets``;
    ``"topk"`` the teacher's ``k`` largest logits; ``"all"`` every class (C backward passes).

    ``squared=True`` is the default: the measurement behind :func:`jacplug.losses.jacobian_distillation`
    found the squared distance of normalised rows in an additive mix (``kd + 10 * jacobian``) best;
    it is the paper's own form (from its Gaussian-noise argument), lies in ``[0, 4]`` whatever the
    input size, and is smooth, while the plain norm's gradient keeps unit size even when the rows
    nearly agree.

    Teacher rows come without a graph from :mod:`jacplug.losses.teacher_rows` (cached); student rows
    from ``jacobian(..., create_graph=True)`` so the term trains the student's parameters.
    """

    name = "jacobian"
    needs = frozenset({"student_logits", "teacher_logits", "input_grad"})  # plus "targets" for classes="label"
    higher_order = frozenset({DOUBLE_BACKWARD})

    def __init__(
        self, classes: str = "top1", k: int = 1, squared: bool = True, eps: float = 1e-8, backend: str = "auto"
    ) -> None:
        super().__init__()
        classes = choice(self.name, "classes", classes, CLASS_CHOICES)
        if classes != "topk" and k != 1:
            raise UserError(f"loss term 'jacobian': k={k!r} only applies to classes='topk' (got classes={classes!r})")
        self.classes, self.k = classes, positive_int(self.name, "k", k)
        self.squared, self.eps, self.backend = boolean(self.name, "squared", squared), positive_float(self.name, "eps", eps), backend
        if classes == "label":
            self.needs = type(self).needs | {"targets"}

    def rows(self, batch: DistillBatch) -> Tensor | None:
        """Selected classes ``[B, R]`` (``None`` for all classes)."""
        if self.classes == "all":
            return None
        if self.classes == "label":
            require(batch, self, "targets")
            return batch.targets.reshape(-1, 1).long()
        require(batch, self, "teacher_logits")
        teacher = batch.teacher_logits.detach()
        if self.classes == "top1":
            return teacher.argmax(dim=1, keepdim=True)
        if self.k > teacher.shape[1]:
            raise UserError(f"loss term 'jacobian': k={self.k} exceeds the {teacher.shape[1]} classes")
        return teacher.topk(self.k, dim=1).indices

    def forward(self, batch: DistillBatch) -> Tensor:
        require(batch, self, "student_logits")
        _check_input_grad(batch, self)
        if resolve_backend(self.backend).requires_callable:
            raise UserError(
                f"loss term 'jacobian': backend {self.backend!r} re-evaluates the models, but this term works on "
                f"computed logits; use a reverse-mode backend (e.g. 'auto', 'loop'), or the 'jacobian-direction' term "
                f"for forward mode and finite differences"
            )
        rows = self.rows(batch)
        teacher = teacher_jacobian_rows(batch, rows, self, backend=self.backend)
        student = jacobian(batch.student_logits, batch.inputs, rows, backend=self.backend, create_graph=True)
        return row_distance(student, teacher, normalize=True, squared=self.squared, eps=self.eps).mean()

    def extra_repr(self) -> str:
        k = f", k={self.k}" if self.classes == "topk" else ""
        return f"name={self.name!r}, classes={self.classes!r}{k}, squared={self.squared}, eps={self.eps:g}"


class ProjectedJacobianLoss(LossTerm):
    """All-class Jacobian matching through ``k`` random output projections.

    Draws ``v ~ N(0, I_C)`` afresh for every sample and call (``[B, k, C]``, shared by teacher and
    student) and returns the mean over batch and projections of ``|| v^T J_S[b] - v^T J_T[b] ||^2``.
    Since ``E_v ||v^T D||^2 = ||D||_F^2``, this is an unbiased estimate of the batch mean of
    ``||J_S[b] - J_T[b]||_F^2`` at the cost of one VJP per projection instead of C backward passes.

    ``normalize=True`` instead returns the mean of ``|| n(v^T J_S) - n(v^T J_T) ||^2`` (unit rows,
    as in ``jacobian``): direction matching of random class mixtures, scale-free (values in
    ``[0, 4]``), but no longer an estimate of the Frobenius distance.
    """

    name = "jacobian-projected"
    needs = frozenset({"student_logits", "teacher_logits", "input_grad"})
    higher_order = frozenset({DOUBLE_BACKWARD})

    def __init__(self, k: int = 1, normalize: bool = False, eps: float = 1e-8) -> None:
        super().__init__()
        self.k = positive_int(self.name, "k", k)
        self.normalize, self.eps = boolean(self.name, "normalize", normalize), positive_float(self.name, "eps", eps)

    def forward(self, batch: DistillBatch) -> Tensor:
        require(batch, self, "student_logits")
        _check_input_grad(batch, self)
        logits = batch.student_logits
        v = torch.randn(logits.shape[0], self.k, logits.shape[1], dtype=logits.dtype, device=logits.device)
        teacher = teacher_vjp(batch, v, self)
        student = vjp(logits, batch.inputs, v, create_graph=True)
        return row_distance(student, teacher, normalize=self.normalize, squared=True, eps=self.eps).mean()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, k={self.k}, normalize={self.normalize}"


class DirectionalJacobianLoss(LossTerm):
    """All-class Jacobian matching through ``k`` random input directions.

    Draws ``u ~ N(0, I)`` of the input's shape afresh for every sample and call (``[B, k, *S]``,
    shared by teacher and student) and returns the mean over batch and directions of
    ``|| J_S[b] u - J_T[b] u ||^2``, an unbiased estimate of the batch mean of
    ``||J_S[b] - J_T[b]||_F^2`` (``E_u ||D u||^2 = ||D||_F^2``). ``J u`` comes from ``jvp`` on the
    models as callables: ``method="forward"`` (forward-mode AD, exact) or ``"finite-difference"``
    (no double backward, biased by O(h) or O(h^2)). With ``scheme="forward"`` (the default) the
    finite difference is ``(f(x + h u) - f(x)) / h`` with ``f(x)`` taken from the batch's logits, so
    each model runs once more per direction; ``scheme="central"`` runs each twice and is second-order
    accurate. Both methods re-run the models.

    ``normalize=True`` returns the mean of ``|| n(J_S u) - n(J_T u) ||^2`` instead (direction
    matching of output changes, scale-free, not a Frobenius estimate).
    """

    name = "jacobian-direction"
    needs = frozenset({"student_fn", "teacher_fn"})

    def __init__(
        self,
        k: int = 1,
        method: str = "forward",
        step: float | None = None,
        normalize: bool = False,
        eps: float = 1e-8,
        scheme: str = "forward",
    ) -> None:
        super().__init__()
        self.method = choice(self.name, "method", method, JVP_METHODS)
        self.scheme = choice(self.name, "scheme", scheme, FD_SCHEMES)
        self.step = None if step is None else positive_float(self.name, "step", step, " or None (automatic)")
        self.k = positive_int(self.name, "k", k)
        self.normalize, self.eps = boolean(self.name, "normalize", normalize), positive_float(self.name, "eps", eps)
        self.higher_order = frozenset({FORWARD_AD}) if self.method == "forward" else frozenset()

    def forward(self, batch: DistillBatch) -> Tensor:
        require(batch, self, "student_fn", "teacher_fn")
        inputs = batch.inputs.detach()
        u = torch.randn(inputs.shape[0], self.k, *inputs.shape[1:], dtype=inputs.dtype, device=inputs.device)
        options = dict(method=self.method, step=self.step, scheme=self.scheme)
        reuse = self.method == "finite-difference" and self.scheme == "forward" and batch.logits_match_fns
        t_base = batch.teacher_logits.detach() if reuse and batch.teacher_logits is not None else None
        s_base = batch.student_logits if reuse else None
        teacher = jvp(batch.teacher_fn, inputs, u, create_graph=False, outputs=t_base, **options).detach()
        student = jvp(batch.student_fn, inputs, u, create_graph=True, outputs=s_base, **options)
        return row_distance(student, teacher, normalize=self.normalize, squared=True, eps=self.eps).mean()

    def extra_repr(self) -> str:
        scheme = f", scheme={self.scheme!r}" if self.method == "finite-difference" else ""
        return f"name={self.name!r}, k={self.k}, method={self.method!r}{scheme}, normalize={self.normalize}"


class NoisyDistillLoss(LossTerm):
    """Output matching on Gaussian-perturbed inputs: the mean over the batch and ``samples`` noise
    draws of ``|| S(x + sigma * z) - T(x + sigma * z) ||^2`` (summed over classes), ``z ~ N(0, I)``.

    Srinivas & Fleuret's equivalence: to first order in ``sigma`` this equals
    ``||S(x) - T(x)||^2 + sigma^2 * ||J_S(x) - J_T(x)||_F^2`` (exactly, for affine models), so it is
    Jacobian matching at the cost of one extra forward pass per draw, without any input gradient.
    The noisy copies are one batch of ``B * samples`` (train-mode BatchNorm sees them together).
    """

    name = "noisy-distill"
    needs = frozenset({"student_fn", "teacher_fn"})

    def __init__(self, sigma: float = 0.1, samples: int = 1) -> None:
        super().__init__()
        self.sigma = positive_float(self.name, "sigma", sigma, " (the noise's standard deviation, e.g. 0.1)")
        self.samples = positive_int(self.name, "samples", samples)

    def forward(self, batch: DistillBatch) -> Tensor:
        require(batch, self, "student_fn", "teacher_fn")
        inputs = batch.inputs.detach()
        noisy = inputs.unsqueeze(1) + self.sigma * torch.randn(
            inputs.shape[0], self.samples, *inputs.shape[1:], dtype=inputs.dtype, device=inputs.device
        )
        noisy = noisy.flatten(0, 1)  # [B * samples, *S]
        with torch.no_grad():
            teacher = batch.teacher_fn(noisy)
        return (batch.student_fn(noisy) - teacher).pow(2).sum(-1).mean()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, sigma={self.sigma:g}, samples={self.samples}"
