"""The start-up probe's batch: every loss term runs once, with both models, before anything is trained.

Why: a student whose forward uses an op without the derivative a Jacobian term takes, an unknown
backend or feature layer, or a shape mismatch would otherwise fail only after the teacher phase
(minutes to hours). ``jacplug train`` hands this batch to :meth:`jacplug.Distiller.check` with the
models as built (the teacher's weights do not matter for any of this); the check leaves no trace.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # the pipeline's data types; this module sits below the pipeline
    from ..data.datasets import DatasetSplits


def probe_batch(splits: DatasetSplits, device: torch.device, size: int = 8) -> tuple[Tensor, Tensor]:
    """The first ``size`` training images and labels (train-mode BatchNorm needs several)."""
    picks = range(min(size, len(splits.train)))
    inputs = torch.stack([splits.train[i][0] for i in picks]).to(device)
    targets = torch.tensor([int(splits.train[i][1]) for i in picks], device=device)
    return inputs, targets
