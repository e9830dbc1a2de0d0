"""Built-in observers: the experiment trackers people watch, TensorBoard and MLflow (``--log tensorboard mlflow``).

Registered through ``register_observers`` exactly as a third-party tracker would be, off by default. Each
factory returns a fresh object whose ``@hookimpl`` methods receive one run's lifecycle events
(:mod:`jacplug.hookspecs`); every phase (the teacher, the student, each experiment cell) becomes a run of
its own in the tracker, so they can be compared side by side. What is logged, in both trackers:

- ``train/<name>`` at each step: the loss, each loss term, the learning rate;
- ``eval/<name>`` at each evaluation, at the evaluated step (``metrics["step"]``, else the epoch):
  accuracies, per-term means, the input-gradient agreement (:mod:`jacplug.agreement`);
- the phase's ``params`` as hyperparameters, the pictures (``on_image``) as images, and the numbers of
  the phase's summary as ``summary/<name>``.

torch.utils.tensorboard and mlflow are imported by the factories only, so listing plugins stays fast and
a missing package matters only to a run that asks for its tracker.
"""

from __future__ import annotations

import numbers
import os
import re
import time
import weakref
from pathlib import Path
from typing import Any, Callable, Mapping

from jacplug import hookimpl
from jacplug.errors import UserError


@hookimpl
def register_observers(register):
    register(
        "tensorboard",
        tensorboard_tracker,
        default=False,
        description="TensorBoard event files, one directory per phase: OUT/tensorboard/PHASE "
        "(`tensorboard --logdir OUT/tensorboard`)",
    )
    register(
        "mlflow",
        mlflow_tracker,
        default=False,
        description="an MLflow run per phase; tracking_uri=URI (default $MLFLOW_TRACKING_URI, else "
        "sqlite:///OUT/mlflow.db)",
    )


def tensorboard_tracker(**options: Any) -> "TensorBoardTracker":
    _check_options("tensorboard", options, ())
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise _missing("tensorboard") from None
    return TensorBoardTracker(SummaryWriter)


def mlflow_tracker(**options: Any) -> "MLflowTracker":
    _check_options("mlflow", options, ("tracking_uri",))
    try:
        import mlflow  # noqa: F401  (the full package: mlflow-skinny lacks the SQL tracking store)
        import sqlalchemy  # noqa: F401
    except ImportError:
        raise _missing("mlflow") from None
    return MLflowTracker(tracking_uri=options.get("tracking_uri"))


class TensorBoardTracker:
    """One TensorBoard run (event directory) per phase: ``phase.out_dir / "tensorboard" / phase.name``."""

    def __init__(self, writer_class: Callable[..., Any]) -> None:
        self._writer_class = writer_class
        self._writers: dict[str, Any] = {}  # phase name -> SummaryWriter
        self._last_step: dict[str, int] = {}  # phase name -> the largest step logged

    @hookimpl
    def on_train_start(self, phase) -> None:
        for name in list(self._writers):  # a phase that never ended (it crashed): write out what it logged
            self._close(name)
        self._writers[phase.name] = self._writer_class(log_dir=str(Path(phase.out_dir) / "tensorboard" / phase.name))
        self._last_step[phase.name] = 0

    @hookimpl
    def on_step_end(self, phase, step, metrics) -> None:
        writer = self._writers[phase.name]
        for name, value in _numbers(metrics).items():
            writer.add_scalar(f"train/{name}", value, step)
        self._last_step[phase.name] = max(self._last_step[phase.name], step)

    @hookimpl
    def on_epoch_end(self, phase, epoch, metrics) -> None:
        writer = self._writers[phase.name]
        step = _evaluated_step(epoch, metrics)
        self._last_step[phase.name] = max(self._last_step[phase.name], step)
        for name, value in _numbers(metrics).items():
            if name != "step":
                writer.add_scalar(f"eval/{name}", value, step)
        writer.flush()  # a run that dies later keeps every evaluation

    @hookimpl
    def on_image(self, phase, name, path, step) -> None:
        import numpy as np
        from PIL import Image

        with Image.open(path) as picture:
            pixels = np.asarray(picture.convert("RGB"))
        self._writers[phase.name].add_image(f"images/{name}", pixels, step, dataformats="HWC")

    @hookimpl
    def on_train_end(self, phase, summary) -> None:
        writer = self._writers[phase.name]
        final = {f"summary/{name}": value for name, value in _numbers(summary).items()}
        # run_name=".": into this phase's own directory, so the HPARAMS tab shows this run, not one beside it;
        # add_hparams writes the final metrics as scalars too
        writer.add_hparams(_hparam_values(phase.params), final, run_name=".", global_step=self._last_step[phase.name])
        self._close(phase.name)

    def _close(self, phase_name: str) -> None:
        writer = self._writers.pop(phase_name, None)
        if writer is not None:
            writer.close()


class MLflowTracker:
    """One MLflow run per phase, named ``phase.name``, in the experiment ``phase.group``.

    The tracking URI: the ``tracking_uri`` option, else ``$MLFLOW_TRACKING_URI``, else a SQLite store in the
    phase's directory (``sqlite:///OUT/mlflow.db``, artifacts in ``OUT/mlartifacts``). Step metrics are
    sent in batches at each evaluation and at the end (one request per step would slow a fast loop down).
    A phase that never reaches ``on_train_end`` is ended as ``FAILED`` when the next phase starts, and any
    run still open when the tracker is collected or the process exits is ended as ``KILLED``, so no run
    stays ``RUNNING``.
    """

    def __init__(self, tracking_uri: str | None = None) -> None:
        self._tracking_uri = tracking_uri
        self._open: dict[str, tuple[Any, str]] = {}  # phase name -> (client, run id), until the phase ends
        self._pending: dict[str, list[Any]] = {}  # phase name -> step metrics not yet sent
        self._last_step: dict[str, int] = {}  # phase name -> the largest step logged (the summary's step)
        weakref.finalize(self, _end_runs, self._open, "KILLED")

    @hookimpl
    def on_train_start(self, phase) -> None:
        from mlflow import MlflowClient
        from mlflow.entities import Param

        _end_runs(self._open, "FAILED")
        uri, local = self._resolve_uri(phase)
        client = MlflowClient(tracking_uri=uri)
        artifacts = Path(phase.out_dir) / "mlartifacts" if local else None
        experiment = _experiment_id(client, phase.group or "jacplug", artifacts)
        run = client.create_run(experiment, run_name=phase.name, tags={"kind": phase.kind, "group": phase.group})
        self._open[phase.name] = (client, run.info.run_id)
        self._pending[phase.name] = []
        self._last_step[phase.name] = 0
        params = [Param(_mlflow_key(key), str(value)[: _limits().param]) for key, value in phase.params.items()]
        for start in range(0, len(params), _limits().params_per_batch):
            client.log_batch(run.info.run_id, params=params[start : start + _limits().params_per_batch])

    @hookimpl
    def on_step_end(self, phase, step, metrics) -> None:
        self._queue(phase.name, "train", metrics, step)
        if len(self._pending[phase.name]) >= _limits().metrics_per_batch:
            self._send(phase.name)

    @hookimpl
    def on_epoch_end(self, phase, epoch, metrics) -> None:
        evaluated = {name: value for name, value in metrics.items() if name != "step"}
        self._queue(phase.name, "eval", evaluated, _evaluated_step(epoch, metrics))
        self._send(phase.name)

    @hookimpl
    def on_checkpoint(self, phase, files) -> None:
        client, run_id = self._open[phase.name]
        for role, path in files.items():
            client.set_tag(run_id, f"checkpoint.{role}", str(path))  # the path only: checkpoints stay on disk

    @hookimpl
    def on_image(self, phase, name, path, step) -> None:
        from PIL import Image

        client, run_id = self._open[phase.name]
        with Image.open(path) as picture:
            client.log_image(run_id, picture.convert("RGB"), key=name, step=step)

    @hookimpl
    def on_train_end(self, phase, summary) -> None:
        self._queue(phase.name, "summary", summary, self._last_step[phase.name])
        self._send(phase.name)
        client, run_id = self._open.pop(phase.name)
        client.set_terminated(run_id, "FINISHED")

    def _resolve_uri(self, phase) -> tuple[str, bool]:
        """``(uri, whether it is the default local store)``: the option wins, as a flag wins over a setting."""
        uri = self._tracking_uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            return uri, False
        return f"sqlite:///{(Path(phase.out_dir) / 'mlflow.db').resolve()}", True

    def _queue(self, phase_name: str, prefix: str, values: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(time.time() * 1000)
        self._last_step[phase_name] = max(self._last_step[phase_name], step)
        self._pending[phase_name].extend(
            Metric(_mlflow_key(f"{prefix}/{name}"), value, stamp, step) for name, value in _numbers(values).items()
        )

    def _send(self, phase_name: str) -> None:
        client, run_id = self._open[phase_name]
        pending, self._pending[phase_name] = self._pending[phase_name], []
        for start in range(0, len(pending), _limits().metrics_per_batch):
            client.log_batch(run_id, metrics=pending[start : start + _limits().metrics_per_batch])


def _end_runs(open_runs: dict[str, tuple[Any, str]], status: str) -> None:
    """End every run still open (a phase that crashed, or a process that exits mid-phase)."""
    while open_runs:
        _, (client, run_id) = open_runs.popitem()
        try:
            client.set_terminated(run_id, status)
        except Exception:  # the store is gone (a deleted directory, a server that stopped): nothing left to end
            pass


def _experiment_id(client: Any, name: str, artifact_dir: Path | None) -> str:
    """The experiment ``name``, created on first use (by another process too: then read back)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        location = artifact_dir.resolve().as_uri() if artifact_dir is not None else None
        return client.create_experiment(name, artifact_location=location)
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


class _Limits:
    """MLflow's limits on one request (keys, parameter values, entries per batch), read from mlflow itself."""

    def __init__(self) -> None:
        from mlflow.utils import validation

        self.key = validation.MAX_ENTITY_KEY_LENGTH
        self.param = validation.MAX_PARAM_VAL_LENGTH
        self.params_per_batch = validation.MAX_PARAMS_TAGS_PER_BATCH
        self.metrics_per_batch = validation.MAX_METRICS_PER_BATCH


_LIMITS: _Limits | None = None


def _limits() -> _Limits:
    global _LIMITS
    if _LIMITS is None:
        _LIMITS = _Limits()
    return _LIMITS


def _mlflow_key(name: str) -> str:
    """MLflow takes letters, digits, ``_ - . /`` and spaces in names, up to its length limit: anything else is ``_``."""
    return re.sub(r"[^\w\-. /]", "_", str(name))[: _limits().key]


def _evaluated_step(epoch: int, metrics: Mapping[str, Any]) -> int:
    """The x-axis of an evaluation: the step it evaluated (so it lines up with the step curves), else its epoch."""
    return int(metrics["step"]) if "step" in metrics else int(epoch)


def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The entries that are numbers (a summary also holds paths and names), as floats."""
    return {
        str(name): float(value)
        for name, value in values.items()
        if isinstance(value, numbers.Real) and not isinstance(value, bool)
    }


def _hparam_values(params: Mapping[str, Any]) -> dict[str, Any]:
    """TensorBoard takes numbers, strings and booleans as hyperparameters; anything else is shown as text."""
    return {
        str(name): value if isinstance(value, (bool, int, float, str)) else str(value) for name, value in params.items()
    }


def _check_options(tracker: str, options: Mapping[str, Any], accepted: tuple[str, ...]) -> None:
    unknown = sorted(set(options) - set(accepted))
    if unknown:
        takes = "takes " + ", ".join(accepted) if accepted else "takes no options"
        raise UserError(f"tracker {tracker!r} got unknown option(s) {', '.join(unknown)}; it {takes}")


def _missing(tracker: str) -> UserError:
    return UserError(f"--log {tracker} needs the {tracker} package: pip install 'jacplug[{tracker}]'")
