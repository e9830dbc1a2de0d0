"""Output-distillation terms: KL, MSE of softened probabilities, CE on the teacher's class, and CE on labels.

All read ``student_logits`` ``[B, C]`` (on the student's graph) and, except ``ce``, the teacher's
logits ``[B, C]``, always through ``.detach()``: the teacher may carry a graph to the inputs for the
Jacobian terms, and no distillation gradient may flow into it.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from ..errors import UserError
from .base import DistillBatch, LossTerm, require
from .values import positive_float

_T_HINT = " (typical: 1 to 8)"


class _SoftenedTerm(LossTerm):
    """A distillation term that softens logits by a temperature ``T`` (shared option and repr)."""

    needs = frozenset({"student_logits", "teacher_logits"})
    default_temperature = 4.0

    def __init__(self, temperature: float | None = None) -> None:
        super().__init__()
        value = self.default_temperature if temperature is None else temperature
        self.temperature = positive_float(self.name, "temperature", value, _T_HINT)

    def extra_repr(self) -> str:
        return f"name={self.name!r}, temperature={self.temperature:g}"


class KDLoss(_SoftenedTerm):
    """``T^2 * KL(softmax(t / T) || softmax(s / T))``, mean over the batch (Hinton et al.).

    Targets are passed in log space (``log_target=True``), which avoids ``log(0)`` for confident
    teachers. The ``T^2`` factor keeps the gradient's scale independent of ``T``, so the term's
    weight need not be retuned with the temperature.
    """

    name = "kd"

    def forward(self, batch: DistillBatch) -> Tensor:
        require(batch, self, "student_logits", "teacher_logits")
        t = self.temperature
        log_p_student = F.log_softmax(batch.student_logits / t, dim=1)
        log_p_teacher = F.log_softmax(batch.teacher_logits.detach() / t, dim=1)
        return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * t * t


class SoftMSELoss(_SoftenedTerm):
    """Mean squared error between ``softmax(s / T)`` and ``softmax(t / T)``, mean over all ``B * C``
    entries (``nn.MSELoss``'s default reduction). Its values are small (probabilities), so it needs
    a much larger weight than ``kd`` to have the same pull."""

    name = "mse-soft"

    def forward(self, batch: DistillBatch) -> Tensor:
        require(batch, self, "student_logits", "teacher_logits")
        t = self.temperature
        return F.mse_loss(
            F.softmax(batch.student_logits / t, dim=1), F.softmax(batch.teacher_logits.detach() / t, dim=1)
        )


class CrossEntropyLoss(LossTerm):
    """Cross-entropy of the student's logits on the ground-truth labels ``targets`` ``[B]``, mean
    over the batch."""

    name = "ce"
    needs = frozenset({"student_logits", "targets"})

    def __init__(self, label_smoothing: float = 0.0) -> None:
        super().__init__()
        if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)) or not (
            0.0 <= label_smoothing < 1.0
        ):
            raise UserError(f"loss term 'ce': label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)

    def forward(self, batch: DistillBatch) -> Tensor:
        require(batch, self, "student_logits", "targets")
        return F.cross_entropy(batch.student_logits, batch.targets.long(), label_smoothing=self.label_smoothing)


class TeacherCELoss(_SoftenedTerm):
    """Cross-entropy of ``s / T`` on the teacher's argmax class (hard pseudo-labels), mean over the
    batch (``CrossEntropyLoss`` on pseudo-labels). ``T`` only rescales the student's logits
    (the argmax does not depend on it)."""

    name = "ce-teacher"
    default_temperature = 1.0

    def forward(self, batch: DistillBatch) -> Tensor:
        require(batch, self, "student_logits", "teacher_logits")
        pseudo_labels = batch.teacher_logits.detach().argmax(dim=1)
        return F.cross_entropy(batch.student_logits / self.temperature, pseudo_labels)
