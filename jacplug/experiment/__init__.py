"""The few-sample distillation experiment: does Jacobian matching help a data-starved student?

``run_experiment(ExperimentConfig(...))`` trains the teacher once, selects loss weights on the
validation split, runs every method x samples-per-class x seed, and writes ``results.json``,
``table.md`` and the plots to ``config.out``. The same protocol, with options, also measures
robustness to input noise (``noise_sigmas``), a ViT student (``student_kwargs``) and the default
preset's weight (method ``preset``). See :mod:`.config` for the options, :mod:`.protocol` for the
protocol, :mod:`.methods` for the compared losses, :mod:`.driver` for the run, :mod:`.executors` for where
the runs execute (processes, GPUs, Ray), :mod:`.records` for resuming, :mod:`.report` for the outputs. ``jacplug experiment`` is its command line, and ``benchmarks/`` holds one script per
published experiment (docs/results.md).

Names are imported lazily: the options (:mod:`.config`) are torch-free, so the command line can build
its flags from them without importing torch.
"""

from __future__ import annotations

from .._lazy import lazy_attributes

_LAZY = {
    "ExperimentConfig": "jacplug.experiment.config",
    "RunSpec": "jacplug.experiment.config",
    "run_experiment": "jacplug.experiment.driver",
    "run_one": "jacplug.experiment.protocol",
    "choose_weights": "jacplug.experiment.protocol",
    "selection_specs": "jacplug.experiment.protocol",
}

__all__ = list(_LAZY)
__getattr__ = lazy_attributes(__name__, _LAZY)
