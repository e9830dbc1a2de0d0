"""The teacher: loaded from a checkpoint, or trained (from timm's pretrained weights or from scratch).

Order of precedence: the run directory's own ``teacher.safetensors`` when resuming; then
``--teacher-checkpoint PATH`` (checked against the model name, class count, input channels and
constructor kwargs; without ``--teacher-kwargs`` the teacher is built with the kwargs the checkpoint
records); otherwise the teacher is trained with cross-entropy for ``--teacher-epochs`` or
``--teacher-steps`` (default 4 epochs; AdamW, cosine schedule, the student's batch size,
``--max-steps-per-epoch`` caps its epochs too; the length arithmetic is :mod:`.steps`), starting from
timm's pretrained weights with ``--pretrained`` (the classifier is re-initialised for the dataset's
classes, so it is fine-tuned, never used as is) or from scratch, and saved as ``teacher.safetensors``
with its validation and test accuracy in the ``metrics`` metadata. A teacher trained here is resumable
like the student (``teacher_resume.safetensors``, see :func:`train_teacher`).

A teacher checkpoint records the input size it was trained at; a run that feeds it another size gets
a one-line warning (:class:`InputSizeWarning`), since its accuracy usually drops there.

Under DDP rank 0 trains the teacher while the other ranks wait, then every rank loads the file;
for long teacher training, train it once in a single process and pass ``--teacher-checkpoint``.
The returned teacher is frozen: eval mode, ``requires_grad_(False)``.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import UserError
from ..io.checkpoint import checkpoint_model_kwargs, load_resume, load_weights, save_model, save_resume
from .config import TrainConfig
from ..data.datasets import DatasetSplits
from .runtime import Runtime, barrier
from ..events import Phase
from .evaluate import accuracy
from .loop import ClassifierStep, EpochBatches, Loop, Position
from .metrics import MetricsLog, read_metrics
from ..models.build import BuiltModel, build_model
from ..events import Events
from .optim import create_adamw
from .plan import DEFAULT_EPOCHS, plan_steps, warn_if_few

TEACHER_FILE = "teacher.safetensors"
#: the teacher phase's resume state (see :func:`train_teacher`)
TEACHER_RESUME_FILE = "teacher_resume.safetensors"


class InputSizeWarning(UserWarning):
    """The teacher checkpoint was trained at another input size than the run feeds it."""


def teacher_kwargs(config: TrainConfig, run_dir: Path | None = None) -> dict:
    """The teacher's constructor kwargs: ``--teacher-kwargs``, or, when none are given and the teacher
    comes from ``--teacher-checkpoint``, the kwargs that checkpoint records (so it rebuilds the same model)."""
    resuming_own = config.resume and run_dir is not None and (run_dir / TEACHER_FILE).is_file()
    if config.teacher_kwargs or not config.teacher_checkpoint or resuming_own:
        return dict(config.teacher_kwargs)
    return checkpoint_model_kwargs(config.teacher_checkpoint) or {}


def build_teacher(config: TrainConfig, splits: DatasetSplits, run_dir: Path | None = None,
                  pretrained: bool = False) -> BuiltModel:
    return build_model("teacher", config.teacher, splits, teacher_kwargs(config, run_dir), pretrained=pretrained)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from the base learning rate to zero over ``total_steps`` (JSON-serialisable state).

    Not ``CosineAnnealingLR``: its recursive (chainable) form rounds differently at every step, which
    would change every published run, and a closed form resumes from the step count alone."""
    total = max(total_steps, 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))


def teacher_length(config: TrainConfig) -> tuple[int | None, int | None]:
    """``(epochs, steps)`` of the teacher phase: the configured one, else :data:`DEFAULT_EPOCHS` epochs."""
    if config.teacher_steps is not None:
        return None, config.teacher_steps
    return (DEFAULT_EPOCHS if config.teacher_epochs is None else config.teacher_epochs), None


def train_teacher(
    model: nn.Module, splits: DatasetSplits, config: TrainConfig, runtime: Runtime, *, run: Any, out_dir: Path,
    group: str, show: bool, length_option: str = "--teacher-steps", resume_file: Path | None = None,
) -> dict[str, Any]:
    """Cross-entropy training on the full training split (the teacher is trained on all of it even
    when ``--samples-per-class`` restricts the student's data: the paper's regime is a strong teacher
    and a data-starved student), through the run loop (:class:`~.loop.Loop` with a
    :class:`~.loop.ClassifierStep`); its events are the ``teacher`` phase's, with ``run`` as their ``run``.
    Returns what it did: ``steps``, ``images`` seen and the final ``val_acc`` (when there is a
    validation split), and ``images_per_s`` (see :attr:`~.loop.Loop.images_per_s`).

    Batches come from seeded, shuffled passes that drop each epoch's incomplete last batch
    (:class:`~.loop.EpochBatches`); the phase is evaluated (validation accuracy) at every evaluation
    point of the plan.

    With ``resume_file`` the phase is resumable as the student's is: its state (weights, optimizer,
    schedule, position, RNG and the batches' generator) is written there before the first step, every
    ``--save-every`` steps and at every evaluation, and a phase that finds the file continues from it,
    dropping the ``metrics.jsonl`` records past it, to end exactly as an uninterrupted phase."""
    # the teacher is trained by rank 0 alone while the other ranks wait: its loop is a single process's
    alone = dataclasses.replace(runtime, rank=0, world_size=1)
    samples = len(splits.train)
    batches = EpochBatches(splits.train, config.batch_size, torch.Generator().manual_seed(config.seed),
                           config.workers)
    epochs, steps = teacher_length(config)
    plan = batches.plan = plan_steps(samples=samples, batch=min(config.batch_size, samples),
                                     steps_per_epoch=len(batches), epochs=epochs, steps=steps,
                                     max_steps_per_epoch=config.max_steps_per_epoch)
    warn_if_few(plan, "teacher", length_option)  # the caller's own option for a longer teacher phase
    optimizer = create_adamw({"teacher": model}, lr=config.teacher_lr, weight_decay=config.weight_decay)
    scheduler = cosine_schedule(optimizer, plan.total)
    position, last = Position(), None
    if resume_file is not None:
        if resume_file.is_file():
            position = Position.from_dict(load_resume(
                resume_file, models={"teacher": model}, optimizer=optimizer, scheduler=scheduler,
                generators={"batches": batches.generator},
                remedy="this run's teacher resume state is damaged: delete it to train the teacher again with "
                       "--resume, or start a new run with another --out"))
        log = MetricsLog(out_dir)
        log.truncate_after(position.step, phase="teacher")  # steps past the saved position run again
        evaluations = [r for r in read_metrics(out_dir) if r.get("kind") == "teacher_epoch"]
        last = evaluations[-1] if evaluations else None

    def evaluate(step: int) -> dict[str, Any]:
        if splits.val is None:
            return {}
        return {"val_acc": accuracy(model, splits.val, alone, batch_size=config.eval_batch_size, show=show,
                                    desc="teacher val")}

    def save_state() -> None:
        save_resume(resume_file, models={"teacher": model}, optimizer=optimizer, scheduler=scheduler,
                    position=position.as_dict(), config=config.to_dict(),
                    generators={"batches": batches.resume_generator(position.step)})

    phase = Phase(kind="teacher", name="teacher", out_dir=out_dir, group=group, params=config.to_dict(), plan=plan)
    events = Events(run, phase, enabled=runtime.is_main)
    loop = Loop(ClassifierStep(model, alone), batches, optimizer, scheduler, plan, alone, events, evaluate, position,
                remedy="lower --teacher-lr (or --weight-decay)", save_every=config.save_every if resume_file else 0,
                save_state=save_state if resume_file else None)
    if resume_file is not None and position.step == 0:
        save_state()  # the phase's start (RNG included), so a phase killed before its first save starts identically
    events.emit("on_train_start")
    last = loop.run(last=last)
    done: dict[str, Any] = {"steps": plan.total, "images": plan.images, "images_per_s": loop.images_per_s}
    if "val_acc" in last:
        done["val_acc"] = last["val_acc"]
    events.emit("on_train_end", summary=done)
    return done


def _check_input_size(meta: dict[str, str], path: str, splits: DatasetSplits) -> None:
    """Warn when the checkpoint's recorded input size differs from the run's."""
    try:
        trained = [int(v) for v in json.loads(meta["input_size"])][1:]
    except (KeyError, ValueError, TypeError):
        return  # a checkpoint without jacplug metadata records no size
    fed = list(splits.input_shape[1:])
    if trained and trained != fed:
        size = "x".join(map(str, trained))
        warnings.warn(
            f"the teacher checkpoint {path!r} was trained on {size} inputs, but this run feeds it "
            f"{'x'.join(map(str, fed))}; its accuracy usually drops at another size: pass --image-size "
            f"{trained[-1]}",
            InputSizeWarning,
            stacklevel=3,
        )


def prepare_teacher(
    config: TrainConfig,
    splits: DatasetSplits,
    runtime: Runtime,
    run_dir: Path,
    run: Any,
    show: bool,
    length_option: str = "--teacher-steps",
) -> tuple[nn.Module, str, float | None]:
    """A frozen teacher on the run's device, where its weights came from (for the summary), and its
    training speed in images/s when it was trained in this run directory (else ``None``). The one
    teacher preparation of ``jacplug train`` and ``jacplug experiment``.

    ``splits`` are the full splits (not the ``--samples-per-class`` subset). A teacher trained here
    keeps its phase's resume state in ``run_dir/teacher_resume.safetensors`` until the caller's next
    phase has saved its own (then :func:`end_teacher_resume`): a run killed at any point in between
    resumes the teacher phase and ends it exactly as an uninterrupted run would."""
    own, resume_file = run_dir / TEACHER_FILE, run_dir / TEACHER_RESUME_FILE
    built: BuiltModel
    speed = None
    if config.resume and own.is_file() and not resume_file.is_file():  # the teacher phase had ended
        built, source = build_teacher(config, splits, run_dir), f"{own} (resumed)"
        load_weights(own, built.module, expected_name=config.teacher, num_classes=splits.num_classes,
                   in_chans=splits.in_chans, model_kwargs=built.kwargs)
    elif config.teacher_checkpoint:
        built, source = build_teacher(config, splits, run_dir), config.teacher_checkpoint
        meta = load_weights(config.teacher_checkpoint, built.module, expected_name=config.teacher,
                          num_classes=splits.num_classes, in_chans=splits.in_chans, model_kwargs=built.kwargs)
        if runtime.is_main:
            _check_input_size(meta, config.teacher_checkpoint, splits)
    else:
        if teacher_length(config)[0] == 0:
            raise UserError(
                "--teacher-epochs must be positive when the teacher is trained here (no --teacher-checkpoint); "
                "an untrained teacher would teach noise"
            )
        if runtime.is_main:
            built = build_teacher(config, splits, run_dir, pretrained=config.pretrained)
            model = built.module.to(runtime.device)
            if runtime.channels_last:
                model = model.to(memory_format=torch.channels_last)
            metrics = train_teacher(model, splits, config, runtime, run=run, out_dir=run_dir, group=str(run_dir),
                                    show=show, length_option=length_option, resume_file=resume_file)
            metrics["test_acc"] = accuracy(model, splits.test, runtime, batch_size=config.eval_batch_size, show=show,
                                           desc="teacher test")
            save_model(own, model, role="teacher", name=config.teacher, num_classes=splits.num_classes,
                       input_shape=splits.input_shape, mean=splits.mean, std=splits.std, config=config.to_dict(),
                       metrics=metrics, model_kwargs=built.kwargs,
                       interpolation=splits.interpolation, crop_pct=splits.crop_pct, crop_mode=splits.crop_mode)
        barrier(runtime)
        built = build_teacher(config, splits, run_dir)
        meta = load_weights(own, built.module)
        trained = json.loads(meta.get("metrics", "{}"))
        speed = trained.get("images_per_s")
        source = f"{own} (trained here: {trained.get('steps', '?')} optimizer steps, {trained.get('images', 0):,} images seen)"
    model = built.module.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.eval().requires_grad_(False)
    return model, source, speed


def end_teacher_resume(run_dir: Path, runtime: Runtime) -> None:
    """Remove the teacher phase's resume state (as large as the teacher and its optimizer state) once the
    phase after it has saved its own: from then on a resumed run starts there."""
    if runtime.is_main:
        (run_dir / TEACHER_RESUME_FILE).unlink(missing_ok=True)
