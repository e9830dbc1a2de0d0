"""The student phase, built once for ``jacplug train`` and for every ``jacplug experiment`` cell.

A phase is wired from the same parts in both commands: AdamW over the student and the loss terms'
adapters (:mod:`.optim`) with a cosine decay to zero over the phase's steps, a :class:`jacplug.Distiller`
step, the held-out gradient agreement (``--agreement-images``), an evaluation of the validation and test
splits, and the run loop (:mod:`.loop`). Building them here, in one place, makes a cell of the experiment
``jacplug train --steps N`` with the cell's options by construction.

What differs between the commands is given by the caller: the batches (a resumable stream, evaluated at
the plan's evaluation points, or one round per cell), the phase's events, scores beside accuracy (a
cell's accuracy under noise), whether a diverging loss stops the phase or fails the run, and, for
``jacplug train`` only, the resume file, the teacher cache and the checkpoints.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn
from torch.utils.data import Dataset

from ..distiller import Distiller
from ..events import Events, Phase
from ..io.checkpoint import load_resume, save_resume
from . import teacher_cache
from .evaluate import accuracy
from .heldout import HeldOutAgreement
from .loop import Batches, Loop, Position
from .metrics import MetricsLog
from .optim import create_adamw
from .runtime import barrier, distribute
from .teacher import cosine_schedule


@dataclass
class StudentPhase:
    """A built student phase: :attr:`loop` runs it (from its saved position when it was resumed);
    :attr:`heldout` is the held-out agreement, when ``--agreement-images`` asks for it on this process."""

    loop: Loop
    distiller: Distiller
    events: Events
    heldout: HeldOutAgreement | None


def build_student_phase(
    run: Any,
    phase: Phase,
    batches: Batches,
    *,
    capture: bool,
    fused: bool = False,
    show: bool = False,
    split_scores: Callable[[nn.Module, Dataset], dict[str, Any]] | None = None,
    on_non_finite: str = "raise",
    resume_file: Path | None = None,
    resume: bool = False,
    cache_path: Path | None = None,
    checkpoints: dict[str, Path] | None = None,
    teacher_input: nn.Module | None = None,
) -> StudentPhase:
    """The student phase of ``run`` (a :class:`jacplug.commands.RunContext`: its config, student, loss,
    teacher, splits, runtime, run directory); ``run.student`` and ``run.loss`` are moved to the device.

    ``capture``: the Distiller's CUDA graph; ``fused``: torch's fused AdamW (CUDA parameters only);
    ``split_scores(student, split)``: more scores per split, recorded as ``<split>_<name>``;
    ``on_non_finite``: as :class:`~.loop.Loop` takes it. ``resume_file``: the phase's resume state; with
    ``resume`` it is loaded when it exists (``metrics.jsonl`` loses the records past it); when none was
    loaded it is written at once (so a run killed before the first save starts the phase with the same
    random state), then every ``--save-every`` steps and at every evaluation. ``cache_path``: the teacher's cached entries (built there unless they match).
    ``checkpoints``: ``{role: path}`` written at every evaluation. ``teacher_input``: the view a teacher trained on
    other statistics takes of the run's tensors (the Distiller's ``teacher_input``); the cache and the held-out
    agreement see the teacher through it too."""
    config, runtime, splits, teacher = run.config, run.runtime, run.splits, run.teacher
    seen = teacher if teacher_input is None else nn.Sequential(teacher_input, teacher).eval()  # as the data reaches it
    student = run.student = run.student.to(runtime.device)
    loss = run.loss = run.loss.to(runtime.device)
    if runtime.channels_last:
        student = run.student = student.to(memory_format=torch.channels_last)
    optimizer = create_adamw({"student": student, "loss": loss}, lr=config.lr, weight_decay=config.weight_decay,
                             fused=fused)
    scheduler = cosine_schedule(optimizer, phase.plan.total)
    position = Position()
    if resume and resume_file is not None:
        if resume_file.is_file():
            position = Position.from_dict(load_resume(resume_file, models={"student": student, "loss": loss},
                                                      optimizer=optimizer, scheduler=scheduler))
        if runtime.is_main:  # steps past the saved position (all of them when none was saved) run again
            MetricsLog(run.out_dir).truncate_after(position.step)
    if resume_file is not None:
        barrier(runtime)  # every process has looked for the saved state before rank 0 writes the phase's start

    def save_state() -> None:
        if runtime.is_main:
            save_resume(resume_file, models={"student": student, "loss": loss}, optimizer=optimizer,
                        scheduler=scheduler, position=position.as_dict(), config=config.to_dict())

    if resume_file is not None and position.step == 0:
        save_state()
    distiller = Distiller(distribute(student, runtime), teacher, loss, amp=runtime.amp_dtype, capture=capture,
                          check_gradients=config.check_gradients and position.step == 0, name=config.student,
                          teacher_input=teacher_input)
    lookup = None
    if cache_path is not None:
        key = teacher_cache.cache_key(seen, splits.train, config.loss, runtime, config.eval_batch_size)
        if runtime.is_main and not teacher_cache.TeacherCache.matches(cache_path, key):
            teacher_cache.build_cache(cache_path, seen, loss, splits.train, runtime, config.eval_batch_size, key,
                                      show)
        barrier(runtime)
        lookup = teacher_cache.TeacherCache(cache_path, runtime.device)
    heldout = (HeldOutAgreement(seen, splits, config.agreement_images)
               if config.agreement_images and runtime.is_main else None)

    def evaluate(step: int) -> dict[str, Any]:
        scores: dict[str, Any] = {}
        for name in ("val", "test"):
            split = getattr(splits, name)
            if split is not None:
                scores[f"{name}_acc"] = accuracy(student, split, runtime, batch_size=config.eval_batch_size,
                                                 show=show, desc=name)
                if split_scores is not None:
                    scores.update({f"{name}_{key}": value for key, value in split_scores(student, split).items()})
        return {**scores, **(heldout.measure(student) if heldout is not None else {})}

    phase = dataclasses.replace(phase, start=position.step)  # a resumed phase says where it resumed
    events = Events(run, phase, enabled=runtime.is_main)
    loop = Loop(distiller, batches, optimizer, scheduler, phase.plan, runtime, events, evaluate, position,
                cache=lookup, on_non_finite=on_non_finite, save_every=config.save_every if resume_file else 0,
                save_state=save_state if resume_file else None, checkpoints=checkpoints)
    return StudentPhase(loop=loop, distiller=distiller, events=events, heldout=heldout)
