"""The `jacplug train` command: its whole run (data, teacher, the student phase, checkpoints, summary) set
up from the layers below (:mod:`jacplug.training`, :mod:`jacplug.io`, :mod:`jacplug.data`, :mod:`jacplug.models`).

``train(TrainConfig(...))`` runs everything and returns the summary; lifecycle hooks receive a
:class:`RunContext`. Each submodule has one job; its docstring says which.
"""

from __future__ import annotations

from .._lazy import lazy_attributes

_LAZY = {
    "TrainConfig": "jacplug.training.config",
    "DatasetSplits": "jacplug.data.datasets",
    "RunContext": "jacplug.commands.train_run",
    "train": "jacplug.commands.train_run",
}

__all__ = list(_LAZY)
__getattr__ = lazy_attributes(__name__, _LAZY)
