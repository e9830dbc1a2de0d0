"""The training pipeline behind ``jacplug train``: data, teacher, schedule, evaluation, checkpoints and
logging around :class:`jacplug.Distiller`, which owns the distillation step.

``train(TrainConfig(...))`` runs everything and returns the summary; lifecycle hooks receive a
:class:`RunContext`. Each submodule has one job; its docstring says which.
"""

from __future__ import annotations

from .._lazy import lazy_attributes

_LAZY = {
    "TrainConfig": "jacplug.pipeline.config",
    "DatasetSplits": "jacplug.pipeline.data",
    "RunContext": "jacplug.pipeline.run",
    "train": "jacplug.pipeline.run",
}

__all__ = list(_LAZY)
__getattr__ = lazy_attributes(__name__, _LAZY)
