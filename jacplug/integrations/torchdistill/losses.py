"""jacplug loss terms as torchdistill mid-level losses (``criterion(student_io_dict, teacher_io_dict, targets)``).

Each adapter owns one jacplug :class:`~jacplug.losses.base.LossTerm`, built by name through jacplug's
loss registry (so terms from third-party jacplug plugins work too), and turns torchdistill's
``io_dict[module_path][io_type]`` into a :class:`~jacplug.losses.base.DistillBatch`:

- logits: ``io_dict['.']['output']`` of each model;
- inputs, model callables, the teacher's on-graph logits and the per-step teacher cache: the
  :class:`~jacplug_plugins.torchdistill_step.StepRecord` that the bridge's forward procedures attach
  to those outputs (required only by terms that need input Jacobians or re-run the models);
- feature maps: ``io_dict[layer]['output']`` for each layer in the term's ``feature_layers``
  (configure torchdistill's ``forward_hook: {output: [...]}`` for them).

Teacher logits are handed over detached unless the term needs ``input_grad``: a term that does not
differentiate through the teacher must not reach its graph, which a Jacobian term frees.

Two refusals come early, so a run does not fail (or silently not learn) later: a term with learnable
parts (the adapters of ``fitnet``) is refused when torchdistill builds the criterion, since
torchdistill's optimizer never sees them; and a term trained through the student's input gradient
checks on its first step, before torchdistill's ``loss.backward()``, that the student has a double
backward (the student's forward procedure already swaps fused attention and hard-sigmoid for
double-differentiable formulations; this catches ops no substitution covers).
"""

from __future__ import annotations

from typing import Any, Mapping

import torch
from torch import Tensor, nn

from jacplug.checks.derivatives import missing_derivative, module_calling
from jacplug.engine.substitutions import DOUBLE_BACKWARD, double_differentiable
from jacplug.losses.base import DistillBatch, LossTerm, as_scalar
from jacplug.losses.extra_evaluation import isolated_running_stats

from .torchdistill_step import STUDENT_PROC, TEACHER_PROC, BridgeConfigError, StepRecord, record_of

SELF = "."  # torchdistill's path of the model itself in an io_dict
NEEDS_RECORD = frozenset({"input_grad", "student_fn", "teacher_fn"})


class JacplugLoss(nn.Module):
    """Any registered jacplug loss term, by name: ``kwargs: {term: 'jacobian', options: {...}}``.

    ``options`` are the term's own keyword arguments (e.g. ``classes``, ``squared`` for
    ``jacobian``). Weights belong to torchdistill's ``WeightedSumLoss`` sub-term ``weight``.
    """

    def __init__(self, term: str, options: Mapping[str, Any] | None = None, **unexpected: Any) -> None:
        super().__init__()
        if unexpected:
            raise BridgeConfigError(
                f"{type(self).__name__} got unknown argument(s) {sorted(unexpected)}; put the jacplug term's own "
                f"options under 'options:', e.g. kwargs: {{term: {term!r}, options: {{...}}}}"
            )
        from jacplug.registry import create_loss

        self.term: LossTerm = create_loss(term, **dict(options or {}))
        _refuse_learnable(self.term)
        self._double_backward_checked = DOUBLE_BACKWARD not in self.term.higher_order

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, targets: Tensor | None = None, *_: Any, **__: Any) -> Tensor:
        batch = self._batch(student_io_dict, teacher_io_dict, targets)
        value = as_scalar(self.term(batch), self.term)
        if not self._double_backward_checked:
            _check_double_backward(value, self.term, record_of(batch.student_logits))
            self._double_backward_checked = True
        return value

    def _batch(self, student_io_dict: dict, teacher_io_dict: dict, targets: Tensor | None) -> DistillBatch:
        student = _logits(student_io_dict, "student")
        teacher = _logits(teacher_io_dict, "teacher")
        needs = self.term.needs
        student_record = teacher_record = None
        if needs & NEEDS_RECORD:
            student_record = _record(student, "student", STUDENT_PROC, self.term)
            teacher_record = _record(teacher, "teacher", TEACHER_PROC, self.term)
            if teacher_record.inputs is not student_record.inputs:
                raise BridgeConfigError(
                    f"loss term {self.term.name!r}: teacher and student ran on different input tensors; both forward "
                    f"procedures must receive the same sample batch (use {TEACHER_PROC!r} and {STUDENT_PROC!r})"
                )
        teacher_logits = teacher.detach()
        if "input_grad" in needs and teacher_record.graph_logits is not None:
            teacher_logits = teacher_record.graph_logits
        features = bool(self.term.feature_layers)
        return DistillBatch(
            # terms that declare none of NEEDS_RECORD never read the inputs
            inputs=student_record.inputs if student_record else None,
            student_logits=student,
            teacher_logits=teacher_logits,
            targets=targets,
            student_fn=student_record.fn if student_record else None,
            teacher_fn=teacher_record.fn if teacher_record else None,
            student_features=_features(student_io_dict, self.term.feature_layers.keys(), "student") if features else {},
            teacher_features=_features(teacher_io_dict, self.term.feature_layers.values(), "teacher") if features else {},
            cache=teacher_record.cache if teacher_record else {},
        )


class JacobianMatchingLoss(JacplugLoss):
    """Eq. 10 of Srinivas & Fleuret (jacplug term ``jacobian``): unit-normalised Jacobian rows of the
    teacher's top-1 class (default), matched by squared L2 distance. ``kwargs`` are the term's
    options directly: ``classes``, ``k``, ``squared``, ``eps``, ``backend``."""

    term_name = "jacobian"

    def __init__(self, **options: Any) -> None:
        super().__init__(self.term_name, options)


class JacobianProjectedLoss(JacobianMatchingLoss):
    """All-class Jacobian matching through ``k`` random output projections (jacplug term
    ``jacobian-projected``; one VJP per projection instead of C backward passes)."""

    term_name = "jacobian-projected"


class JacobianDirectionalLoss(JacobianMatchingLoss):
    """All-class Jacobian matching through ``k`` random input directions (jacplug term
    ``jacobian-direction``; forward mode or finite differences, no double backward)."""

    term_name = "jacobian-direction"


def _refuse_learnable(term: LossTerm) -> None:
    """torchdistill's optimizer holds the student's (and ``module_wise_configs``') parameters only,
    so a term's own parameters would never be trained: refuse the term while the config is built."""
    learnable = sum(p.numel() for p in term.parameters())
    if learnable:
        raise BridgeConfigError(
            f"jacplug loss term {term.name!r} has {learnable} learnable parameters (its adapters), but torchdistill's "
            f"optimizer only trains the student's modules, so they would keep their random initialisation; in "
            f"torchdistill, put the adapter into the student (`adaptations:` under train.student, as torchdistill's "
            f"FitNet configs do) and match its hooked output with an MSE loss, or train with `jacplug train`"
        )


def _check_double_backward(value: Tensor, term: LossTerm, student: StepRecord) -> None:
    """Differentiate ``value`` w.r.t. the inputs once, keeping the graph, so that an op without a
    double backward fails here, named, instead of in torchdistill's ``loss.backward()``.

    The student ran inside :func:`jacplug.double_differentiable`, so this fires only for ops no
    registered substitution covers. The path to the inputs runs through every node of the student's
    first-order backward graph, and no parameter's ``.grad`` (nor DDP's reducer) is touched.
    """
    if not value.requires_grad:
        return
    try:
        torch.autograd.grad(value, student.inputs, retain_graph=True, allow_unused=True)
    except RuntimeError as exc:
        op = missing_derivative(exc)
        if op is None:
            raise
        raise BridgeConfigError(
            f"loss term {term.name!r} trains the student through its input gradient (a double backward), but {op} "
            f"has no derivative{_where(student, op)} and no op substitution covers it; use JacobianDirectionalLoss "
            f"with method: 'finite-difference' (no double backward) instead, or register an op substitution "
            f"(docs/jacobian.md)"
        ) from exc


def _where(student: StepRecord, op: str) -> str:
    """`` in module NAME (Class)``: the student module that dispatches ``op``, found by re-running it."""
    model = student.model
    if model is None:
        return ""

    def forward() -> None:
        with torch.no_grad(), double_differentiable():
            model(student.inputs.detach())

    with isolated_running_stats(model):
        module = module_calling(model, forward, op)
    return f" in the student's module {module}" if module else ""


def _logits(io_dict: dict, who: str) -> Tensor:
    try:
        return io_dict[SELF]["output"]
    except KeyError:
        raise BridgeConfigError(f"torchdistill's {who} io_dict has no '.'/'output' entry (the model's output)") from None


def _record(output: Tensor, who: str, proc: str, term: LossTerm) -> StepRecord:
    record = record_of(output)
    if record is None:
        raise BridgeConfigError(
            f"loss term {term.name!r} needs {sorted(term.needs & NEEDS_RECORD)}, but the {who}'s forward procedure did "
            f"not provide them; set `forward_proc: {proc!r}` under train.{who} in the torchdistill config "
            f"(and `import jacplug_plugins.torchdistill_bridge` or list it under `dependencies:`)"
        )
    return record


def _features(io_dict: dict, layers: Any, who: str) -> dict[str, Tensor]:
    features = {}
    for layer in layers:
        try:
            features[layer] = io_dict[layer]["output"]
        except KeyError:
            raise BridgeConfigError(
                f"feature map of {who} layer {layer!r} is missing from torchdistill's io_dict; add it under "
                f"train.{who}.forward_hook.output in the config"
            ) from None
    return features
