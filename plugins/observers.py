"""Built-in run observers: the metrics file, the progress display, the student's checkpoints and the curves
plot. They register through ``register_observers`` exactly as a third-party observer does; a run switches off
any but the checkpoint writer with ``--log-off NAME``. Every file they write goes through :mod:`jacplug.io.files`."""

from __future__ import annotations

from pathlib import Path

from jacplug import hookimpl


def _metrics_dir(phase) -> Path:
    """``metrics.jsonl``'s directory: the run directory, or for an experiment cell ``OUT/cells/CELL``."""
    return phase.out_dir / "cells" / phase.name if phase.kind == "cell" else phase.out_dir


class MetricsFile:
    """``metrics.jsonl``: a record per student step and per evaluation (``teacher_epoch`` for the teacher's)."""

    def __init__(self) -> None:
        self.logs: dict[str, object] = {}

    def _log(self, phase):
        from jacplug.training.metrics import MetricsLog

        if phase.name not in self.logs:
            directory = _metrics_dir(phase)
            directory.mkdir(parents=True, exist_ok=True)
            self.logs[phase.name] = MetricsLog(directory)
        return self.logs[phase.name]

    @hookimpl
    def on_train_start(self, phase):
        if phase.kind == "cell":  # a cell always runs whole (again, when retried or resumed): no old records
            self._log(phase).start_afresh()

    @hookimpl
    def on_step_end(self, phase, step, metrics):
        if phase.kind != "teacher":
            plan = phase.plan
            self._log(phase).write({"kind": "step", "step": step, "epoch": plan.epoch_of(step),
                                    "images": step * plan.batch, **metrics})

    @hookimpl
    def on_epoch_end(self, phase, epoch, metrics):
        kind = "teacher_epoch" if phase.kind == "teacher" else "epoch"
        self._log(phase).write({"kind": kind, "epoch": epoch, **metrics})


class ProgressDisplay:
    """Progress of the teacher and student phases: tqdm bars on a terminal, plain lines in logs (see
    :mod:`jacplug.training.progress`). Experiment cells report one line each when they finish, elsewhere."""

    def __init__(self, bars: bool | None = None) -> None:
        self.bars = bars
        self.reports: dict[str, object] = {}

    @hookimpl
    def on_train_start(self, run, phase):
        from jacplug.training.progress import PhaseProgress, want_progress

        if phase.kind == "cell":
            return
        model = run.config.teacher if phase.kind == "teacher" else run.config.student
        bars = want_progress(run.config.progress if self.bars is None else self.bars)
        self.reports[phase.name] = report = PhaseProgress(f"{phase.kind} {model}", phase.plan, bars=bars,
                                                                     start=phase.start)
        report.start()

    @hookimpl
    def on_step_end(self, phase, step, metrics):
        if phase.name in self.reports:
            self.reports[phase.name].step(step, metrics["loss"])

    @hookimpl
    def on_epoch_end(self, phase, metrics):
        if phase.name in self.reports:
            self.reports[phase.name].evaluated(metrics["step"], metrics)

    @hookimpl
    def on_train_end(self, phase):
        report = self.reports.pop(phase.name, None)
        if report is not None:
            report.close()


class CheckpointWriter:
    """``student_best.safetensors`` and ``student_last.safetensors`` with the model's name, classes, input
    shape, normalisation, configuration and scores; written first, so observers after it can read them.

    Essential: a file it cannot write ends the run with one line naming it (see :mod:`jacplug.training.observers`),
    before the resume state is saved, so ``--resume`` redoes the evaluation and writes it again."""

    @hookimpl(tryfirst=True)
    def on_checkpoint(self, run, phase, metrics, files):
        from jacplug.io.checkpoint import save_model

        if phase.kind != "student":
            return
        config, splits = run.config, run.splits
        for role, path in files.items():
            save_model(path, run.student, role=f"student_{role}", name=config.student, num_classes=splits.num_classes,
                       input_shape=splits.input_shape, mean=splits.mean, std=splits.std, config=config.to_dict(),
                       metrics=metrics, model_kwargs=run.student_kwargs, interpolation=splits.interpolation,
                       crop_pct=splits.crop_pct, crop_mode=splits.crop_mode)


class CurvesPlot:
    """``curves.png`` from ``metrics.jsonl`` when the student phase ends (its path in the summary as ``plot``),
    announced through ``on_image``."""

    @hookimpl(tryfirst=True)
    def on_train_end(self, run, phase, summary):
        from jacplug.training.metrics import METRICS, plot_curves
        from jacplug.registry import get_host

        if phase.kind != "student" or not (_metrics_dir(phase) / METRICS).is_file():
            return
        path = plot_curves(_metrics_dir(phase))
        summary["plot"] = str(path)
        get_host().notify("on_image", run=run, phase=phase, name="curves", path=path, step=phase.plan.total)


@hookimpl
def register_observers(register):
    register("metrics", MetricsFile, default=True, description="metrics.jsonl: every step and evaluation")
    register("progress", ProgressDisplay, default=True, description="progress bars or lines on stderr")
    register("checkpoints", CheckpointWriter, default=True, essential=True,
             description="student_best/last.safetensors at every evaluation")
    register("plot", CurvesPlot, default=True, description="curves.png from metrics.jsonl at the end")
