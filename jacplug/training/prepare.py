"""What every command prepares the same way before it trains or checks anything: the data, the loss from its
specs, and the start-up check of the distillation step (``jacplug train``, ``check`` and ``experiment`` alike),
so a bad name, option or op is refused by one path, in one line, before any work."""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, Sequence

import torch
from torch import nn

from ..checks.gradient_flow import TermFlow, raise_for_detached
from ..distiller import Distiller
from ..losses.composite import WeightedLoss
from ..losses.presets import DEFAULT_SPECS
from ..registry import create_dataset, model_pair
from ..data.datasets import DatasetSplits
from ..io.folders import removed_if_unused
from .runtime import Runtime


def load_data(config: Any) -> DatasetSplits:
    """The dataset a configuration names (``dataset``, ``data_root``, ``download``, ``image_size`` and, where
    the configuration has it, ``augment``), through the registry. A download that fails leaves no empty
    ``--data-root`` behind."""
    fetching = removed_if_unused(config.data_root) if config.download and config.data_root else nullcontext()
    with fetching:
        return create_dataset(config.dataset, root=config.data_root, download=config.download,
                              image_size=config.image_size, augment=getattr(config, "augment", None))


def loss_for_pair(specs: Sequence[str] | None, teacher: str, student: str) -> WeightedLoss:
    """The loss of ``specs`` (none: :data:`~jacplug.losses.presets.DEFAULT_SPECS`) through the registry; feature
    terms get the registered ``teacher->student`` pair's layers and channels."""
    from ..losses import build_loss as from_specs, options_from_pair

    pair = model_pair(teacher, student)
    overrides = {"fitnet": options_from_pair(pair)} if pair is not None else None
    return from_specs(list(specs or DEFAULT_SPECS), overrides)


def check_step(student: nn.Module, teacher: nn.Module, loss: WeightedLoss, inputs: torch.Tensor,
               targets: torch.Tensor, runtime: Runtime, *, name: str, require_flow: bool = True) -> list[TermFlow]:
    """Every term once on ``inputs`` through :meth:`jacplug.Distiller.check` (options, feature layers, ops
    without the derivatives a term takes, shapes), leaving nothing changed; with ``require_flow``, a term that
    cannot reach the student is refused too. Returns the gradient-flow report."""
    distiller = Distiller(student.to(runtime.device).train(), teacher.to(runtime.device), loss.to(runtime.device),
                          amp=runtime.amp_dtype, name=name)
    report = distiller.check(inputs, targets)
    if require_flow:
        raise_for_detached(report)
    return report
