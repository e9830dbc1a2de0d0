"""jacplug loss terms as torchdistill mid-level losses (``criterion(student_io_dict, teacher_io_dict, targets)``).

Each adapter owns one jacplug :class:`~jacplug.losses.base.LossTerm`, built by name through jacplug's
loss registry (so terms from third-party jacplug plugins work too). The terms are computed by the step's
:class:`jacplug.Distiller` (see :mod:`jacplug.integrations.torchdistill.procedures`), so an adapter only
reads its term's value from the Distiller's result, which rides on the student's output
(``io_dict['.']['output']``). Feature maps are captured by the Distiller itself: a jacplug feature term
needs no torchdistill ``forward_hook``.

A term with learnable parts (the adapters of ``fitnet``) is refused when torchdistill builds the
criterion, since torchdistill's optimizer never sees them.
"""

from __future__ import annotations

from typing import Any, Mapping

from torch import Tensor, nn

from ...losses.base import LossTerm
from ...registry import create_loss
from .step import PRE_EPOCH_PROC, STUDENT_PROC, BridgeConfigError, result_of

SELF = "."  # torchdistill's path of the model itself in an io_dict


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
        self.term: LossTerm = create_loss(term, **dict(options or {}))
        _refuse_learnable(self.term)
        self.key = self.term.name  # its key in the Distiller's result; the pre-epoch process keeps keys unique

    def forward(self, student_io_dict: dict, teacher_io_dict: dict, targets: Tensor | None = None, *_: Any,
                **__: Any) -> Tensor:
        result = result_of(_logits(student_io_dict, "student"))
        if result is None or self.key not in result:
            raise BridgeConfigError(
                f"loss term {self.term.name!r} is computed by the step's Distiller, but the student's forward "
                f"procedure did not run it; set `forward_proc: {STUDENT_PROC!r}` under train.student and "
                f"`pre_epoch_process: {PRE_EPOCH_PROC!r}` under train in the torchdistill config (and list "
                f"`jacplug.integrations.torchdistill` under `dependencies:`)"
            )
        return result[self.key]


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


def _logits(io_dict: dict, who: str) -> Tensor:
    try:
        return io_dict[SELF]["output"]
    except KeyError:
        raise BridgeConfigError(f"torchdistill's {who} io_dict has no '.'/'output' entry (the model's output)") from None
