"""Epoch-level pieces for torchdistill's own training loop: each loss term's value in the log, the
metric that ``ReduceLROnPlateau`` needs, and the student's validation accuracy.

Why: torchdistill's ``WeightedSumLoss`` returns only the total, so a Jacobian term's size is never
visible; and torchdistill's default post-epoch process steps a ``ReduceLROnPlateau`` with
``metrics=None``, which is what its own example script passes (it calls ``post_epoch_process()``
without arguments), so such a scheduler fails with a ``TypeError``. Two registered pieces fix both
without changing torchdistill's loop:

- :class:`JacplugWeightedSumLoss` (high-level loss): torchdistill's ``WeightedSumLoss`` itself,
  same config and same sum, whose sub-terms' values and total are accumulated over the epoch as
  device tensors (no host synchronisation per step);
- :func:`post_epoch_process` (``jacplug_post_epoch_process``): logs the epoch means of each term,
  then runs torchdistill's default post-epoch process with the metric :func:`plateau_metric` gives.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torchdistill.core.interfaces.registry import POST_EPOCH_PROC_FUNC_DICT
from torchdistill.losses.high_level import WeightedSumLoss

from .step import BridgeConfigError

#: torchdistill logs through the root logger, so these lines land in its ``--run_log`` file too
logger = logging.getLogger(__name__)
TOTAL = "total"


class TermMeter:
    """Sums of each term's per-step values since the last :meth:`reset`, kept on the device."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self.epoch = 0

    def add(self, name: str, value: Any) -> None:
        value = value.detach() if isinstance(value, Tensor) else torch.tensor(float(value))
        self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.counts[name] = self.counts.get(name, 0) + 1

    def means(self) -> dict[str, float]:
        """``{term: mean value}`` since the last reset (one host synchronisation per term)."""
        return {name: float(total) / self.counts[name] for name, total in self.sums.items()}

    def reset(self) -> None:
        self.sums.clear()
        self.counts.clear()
        self.epoch += 1


class _Recorded(nn.Module):
    """A sub-criterion that also hands each value it returns to the meter; prints as the criterion."""

    def __init__(self, name: str, criterion: nn.Module, meter: TermMeter) -> None:
        super().__init__()
        self.name, self.criterion, self.meter = name, criterion, meter

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        value = self.criterion(*args, **kwargs)
        self.meter.add(self.name, value)
        return value

    def __repr__(self) -> str:
        return repr(self.criterion)


class JacplugWeightedSumLoss(WeightedSumLoss):
    """torchdistill's ``WeightedSumLoss`` (same ``kwargs``: ``sub_terms``, ``model_term``) that keeps
    each sub-term's unweighted value and the weighted total for the epoch log (:attr:`meter`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.meter = TermMeter()
        self.weights = {name: factor for name, (_, factor) in self.term_dict.items()}
        self.term_dict = {
            name: (_Recorded(name, criterion, self.meter), factor) for name, (criterion, factor) in self.term_dict.items()
        }

    def forward(self, io_dict: dict, model_loss_dict: dict, targets: Any) -> Tensor:
        total = super().forward(io_dict, model_loss_dict, targets)
        self.meter.add(TOTAL, total)
        return total


def top1_accuracy(model: nn.Module, loader: Any, device: torch.device) -> float:
    """Top-1 accuracy (%) of ``model`` in eval mode over ``loader`` (batches ``(images, labels, ...)``),
    summed over processes when ``torch.distributed`` is initialised; the model's mode is restored."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(2, dtype=torch.float64, device=device)
    with torch.no_grad():
        for batch in loader:
            images, labels = batch[0].to(device), batch[1].to(device)
            counts[0] += (model(images).argmax(dim=1) == labels).sum()
            counts[1] += labels.numel()
    model.train(was_training)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(counts)
    return float(100.0 * counts[0] / counts[1].clamp_min(1))


def trained_model(box: Any) -> nn.Module:
    """The model being trained: the student of a DistillationBox, the model of a TrainingBox."""
    return box.student_model if hasattr(box, "student_model") else box.model


def plateau_metric(box: Any, val_accuracy: float | None = None) -> float | None:
    """The value to step the box's epoch-wise ``ReduceLROnPlateau`` with (``None`` for any other scheduler).

    ``mode: 'max'``: the student's top-1 accuracy on ``train.val_data_loader`` (``val_accuracy`` when
    the caller has just measured it, otherwise measured here). ``mode: 'min'``: the epoch's mean
    training loss, from :class:`JacplugWeightedSumLoss`.
    """
    scheduler = getattr(box, "lr_scheduler", None)
    if not isinstance(scheduler, ReduceLROnPlateau) or (box.scheduling_step or 0) > 0:
        return None
    if scheduler.mode == "max":
        if val_accuracy is not None:
            return val_accuracy
        if getattr(box, "val_data_loader", None) is None:
            raise BridgeConfigError(
                "ReduceLROnPlateau with mode: 'max' steps on the student's validation top-1 accuracy, but "
                "train.val_data_loader is not set; add one, or use mode: 'min' to step on the epoch's mean training loss"
            )
        return top1_accuracy(trained_model(box), box.val_data_loader, box.device)
    meter = getattr(box.criterion, "meter", None)
    means = meter.means() if meter is not None else {}
    if TOTAL not in means:
        raise BridgeConfigError(
            "ReduceLROnPlateau with mode: 'min' steps on the epoch's mean training loss, which only "
            "JacplugWeightedSumLoss records; set key: 'JacplugWeightedSumLoss' under train.criterion, or use "
            "mode: 'max' with a train.val_data_loader to step on validation accuracy"
        )
    return means[TOTAL]


def post_epoch_process(self: Any, metrics: Any = None, **kwargs: Any) -> None:
    """torchdistill post-epoch process (``post_epoch_process: 'jacplug_post_epoch_process'``).

    ``self`` is torchdistill's DistillationBox or TrainingBox. Logs each term's epoch mean (with
    :class:`JacplugWeightedSumLoss`), then runs torchdistill's default post-epoch process with
    ``metrics`` or, when none is passed, :func:`plateau_metric`.
    """
    meter = getattr(getattr(self, "criterion", None), "meter", None)
    if metrics is None:
        metrics = plateau_metric(self)
    if meter is not None:
        log_terms(meter, getattr(self.criterion, "weights", {}))
        meter.reset()
    teacher = "with" if hasattr(self, "student_model") else "without"
    POST_EPOCH_PROC_FUNC_DICT[f"default_post_epoch_process_{teacher}_teacher"](self, metrics=metrics, **kwargs)


def log_terms(meter: TermMeter, weights: dict[str, float]) -> None:
    """One line per epoch: ``kd=0.8123 (x1.0)  jacobian=0.0312 (x10.0)  total=1.1243``."""
    means = meter.means()
    if not means:
        return
    parts = [
        f"{name}={value:.4f}" + (f" (x{weights[name]:g})" if name in weights else "")
        for name, value in means.items()
        if name != TOTAL
    ]
    if TOTAL in means:
        parts.append(f"{TOTAL}={means[TOTAL]:.4f}")
    steps = meter.counts.get(TOTAL, max(meter.counts.values()))
    logger.info("epoch %d loss terms (mean of %d steps): %s", meter.epoch, steps, "  ".join(parts))
