"""The training pipeline behind ``jacplug train``: data, teacher, schedule, evaluation, checkpoints and
logging around :class:`jacplug.Distiller`, which owns the distillation step.

``train(TrainConfig(...))`` runs everything and returns the summary; lifecycle hooks receive a
:class:`RunContext`. Each submodule has one job; its docstring says which.
"""

from __future__ import annotations

import importlib
from typing import Any

_LAZY = {
    "TrainConfig": "jacplug.pipeline.config",
    "DatasetSplits": "jacplug.pipeline.data",
    "RunContext": "jacplug.pipeline.run",
    "train": "jacplug.pipeline.run",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'jacplug.pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
