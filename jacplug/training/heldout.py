"""What the student learned, seen on held-out images: the agreement of its input gradients with the teacher's at
every evaluation, and a picture of the gradient maps before and after training (:mod:`jacplug.agreement`)."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..agreement import agreement_with, gradient_map_figure, gradient_maps, reference_maps, teacher_reference
from ..data.datasets import DatasetSplits

#: images shown in the gradient-map picture
PICTURED = 8
GRADIENT_MAPS = "gradient_maps.png"


class HeldOutAgreement:
    """A fixed held-out subset (``count`` images spread evenly over the validation split, else the test split)
    on which the student is compared with the frozen ``teacher``; the first :data:`PICTURED` of them are drawn.

    The teacher's rows and maps are computed once (it is frozen), so an evaluation costs the student's forward
    and backward on the subset; :meth:`start` keeps the student's maps before training."""

    def __init__(self, teacher: nn.Module, splits: DatasetSplits, count: int) -> None:
        split = splits.val if splits.val is not None else splits.test
        picks = torch.linspace(0, len(split) - 1, min(count, len(split))).round().long().unique().tolist()
        self.teacher, self.splits = teacher, splits
        self.images = torch.stack([split[i][0] for i in picks])
        self.reference = teacher_reference(teacher, self.images)
        self.classes, self.teacher_maps = reference_maps(self.reference, PICTURED)
        self.before: torch.Tensor | None = None

    def start(self, student: nn.Module) -> None:
        self.before = gradient_maps(student, self.images[:PICTURED], self.classes)

    def measure(self, student: nn.Module) -> dict[str, float]:
        """``agreement_cosine`` and ``agreement_distance`` (see :func:`jacplug.agreement.input_gradient_agreement`)."""
        return agreement_with(student, self.reference)

    def picture(self, student: nn.Module, path: Path) -> Path:
        """The images over the teacher's maps and the student's before (:meth:`start`) and now."""
        shown = self.images[:PICTURED]
        after = gradient_maps(student, shown, self.classes)
        return gradient_map_figure(shown, self.teacher_maps, self.before if self.before is not None else after, after,
                                   path, mean=self.splits.mean, std=self.splits.std)
