"""What every command prepares the same way before it trains or checks anything: the data, the loss from its
specs, and the start-up check of the distillation step (``jacplug train``, ``check`` and ``experiment`` alike),
so a bad name, option or op is refused by one path, in one line, before any work."""

from __future__ import annotations

import math
from contextlib import nullcontext
from typing import Any, Sequence

import torch
from torch import nn

from ..checks.gradient_flow import TermFlow, raise_for_detached
from ..distiller import Distiller
from ..losses import build_loss as from_specs, options_from_pair
from ..losses.composite import WeightedLoss
from ..losses.presets import DEFAULT_SPECS
from ..registry import create_dataset, model_pair
from ..data.datasets import DatasetSplits
from ..errors import UserError
from ..io.folders import removed_if_unused
from ..models.data_config import student_preprocessing
from ..models import memory
from .runtime import Runtime
from .teacher import teacher_kwargs


def load_data(config: Any) -> DatasetSplits:
    """The dataset a configuration names (``dataset``, ``data_root``, ``download``, ``image_size`` and, where
    the configuration has them, ``augment`` and the preprocessing options), through the registry, with the
    student's timm data configuration as ``preprocessing`` (:func:`~..models.data_config.student_preprocessing`).
    A download that fails leaves no empty ``--data-root`` behind."""
    fetching = removed_if_unused(config.data_root) if config.download and config.data_root else nullcontext()
    with fetching:
        return create_dataset(config.dataset, root=config.data_root, download=config.download,
                              image_size=config.image_size, augment=getattr(config, "augment", None),
                              preprocessing=student_preprocessing(config))


def check_memory(config: Any, splits: DatasetSplits, runtime: Runtime) -> None:
    """A one-line :class:`UserError` when one training step of ``batch_size`` images at the splits' input
    size keeps more activations than the run's device has free (:mod:`..models.memory`: a lower bound,
    so nothing that could run is refused), naming the largest size that would fit; before any model is built.

    The models counted are those the run trains: the student, and the teacher unless a checkpoint gives it."""
    free = memory.available_bytes(runtime.device)
    height, width = splits.input_shape[1:]
    if free is None or height != width:
        return
    batch = min(config.batch_size, len(splits.train))
    models = [("student", config.student, dict(config.student_kwargs))]
    if not config.teacher_checkpoint:
        models.append(("teacher", config.teacher, teacher_kwargs(config)))
    for role, name, kwargs in models:
        elements = memory.activation_elements(name, kwargs, splits.in_chans, splits.num_classes, height)
        needed = (elements or 0) * batch * 4
        if needed > free:
            fits = max(8, int(height * math.sqrt(free / needed)) // 8 * 8)
            raise UserError(
                f"--image-size {height}: one training step of {batch} images keeps at least {needed / 1e9:,.1f} GB of "
                f"activations in the {role} {name!r}, more than the {free / 1e9:,.1f} GB free on {runtime.device}; "
                f"pass --image-size {fits} or less, or a smaller --batch-size")


def loss_for_pair(specs: Sequence[str] | None, teacher: str, student: str) -> WeightedLoss:
    """The loss of ``specs`` (none: :data:`~jacplug.losses.presets.DEFAULT_SPECS`) through the registry; feature
    terms get the registered ``teacher->student`` pair's layers and channels."""
    pair = model_pair(teacher, student)
    overrides = {"fitnet": options_from_pair(pair)} if pair is not None else None
    return from_specs(list(specs or DEFAULT_SPECS), overrides)


def check_step(student: nn.Module, teacher: nn.Module, loss: WeightedLoss, inputs: torch.Tensor,
               targets: torch.Tensor, runtime: Runtime, *, name: str, require_flow: bool = True,
               teacher_input: nn.Module | None = None) -> list[TermFlow]:
    """Every term once on ``inputs`` through :meth:`jacplug.Distiller.check` (options, feature layers, ops
    without the derivatives a term takes, shapes), leaving nothing changed; with ``require_flow``, a term that
    cannot reach the student is refused too. ``teacher_input``: the Distiller's (the teacher's normalisation).
    Returns the gradient-flow report."""
    view = teacher_input.to(runtime.device) if teacher_input is not None else None
    distiller = Distiller(student.to(runtime.device).train(), teacher.to(runtime.device), loss.to(runtime.device),
                          amp=runtime.amp_dtype, name=name, teacher_input=view)
    report = distiller.check(inputs, targets)
    if require_flow:
        raise_for_detached(report)
    return report
