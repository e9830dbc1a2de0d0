"""A run's events: where each comes from (:class:`Phase`) and what emits them (:class:`Events`); torch-free, so
plugins import it cheaply."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from .registry import PluginHost, get_host

#: the kinds of phase a run loop runs
PHASE_KINDS = ("teacher", "student", "cell")


@dataclass(frozen=True)
class Phase:
    """One training phase: the teacher or the student of ``jacplug train``, or one cell of ``jacplug experiment``.

    ``name`` is unique within the run (``"teacher"``, ``"student"``, or the cell's id such as
    ``"main-kd+jacobian-n5-seed0"``), so a tracker can open one run per phase. ``out_dir`` is the directory
    the phase writes to. ``group`` names what the phase belongs to (the run or the experiment directory), so
    a tracker can group an experiment's cells. ``params``: the phase's configuration, flat and
    JSON-serialisable (a tracker's hyperparameters).
    """

    kind: str
    name: str
    out_dir: Path
    group: str
    params: Mapping[str, Any] = field(default_factory=dict)
    #: the phase's :class:`jacplug.training.plan.StepPlan` (``total`` steps, ``batch``, ``epoch_of(step)``)
    plan: Any = None
    #: the step a resumed phase continues after (0: it starts from the beginning)
    start: int = 0

    def __post_init__(self) -> None:
        if self.kind not in PHASE_KINDS:
            raise ValueError(f"phase kind must be one of {PHASE_KINDS}, got {self.kind!r}")


@dataclass
class Events:
    """Emits one phase's lifecycle hooks; a no-op off rank 0 (``enabled=False``)."""

    run: Any
    phase: Phase
    enabled: bool = True
    host: PluginHost | None = None

    def emit(self, hook: str, **kwargs: Any) -> None:
        if self.enabled:
            (self.host or get_host()).notify(hook, run=self.run, phase=self.phase, **kwargs)
