"""One training loop for every phase: the teacher and the student of ``jacplug train``, and each cell of
``jacplug experiment``.

A phase hands the loop a *step object* (a :class:`jacplug.Distiller`, or for the teacher a
:class:`ClassifierStep` of the same shape: ``compute_gradients(inputs, targets) -> {"loss", "output", ...}``
with the gradients in ``.grad``, as timm's classification task is a task too), its batches, the
optimizer and schedule, the step plan and what to evaluate. The loop steps, checks that the loss is
finite, keeps the running means between evaluations, tracks the best score, and tells the phase's
observers what happened through the lifecycle hooks (:class:`Events`); everything else a run does
(the metrics file, progress, checkpoints, plots, trackers) is an observer plugin.
"""

from __future__ import annotations

import itertools
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, Sampler

from ..errors import UserError
from .runtime import Runtime, any_rank
from ..events import Events
from .plan import WARMUP_STEPS, StepPlan, batch_stream


class StepObject(Protocol):
    """What the loop steps: a :class:`jacplug.Distiller` or a :class:`ClassifierStep`."""

    def compute_gradients(self, inputs: torch.Tensor, targets: torch.Tensor, *, cached: Any = None) -> dict: ...

    def train(self, mode: bool = True) -> Any: ...


class ClassifierStep:
    """A classifier's cross-entropy step in the shape of a :class:`jacplug.Distiller` call.

    ``compute_gradients`` runs the model under the run's autocast, takes the cross-entropy of its logits
    in float32, sets every parameter's ``.grad`` to ``None`` (as ``optimizer.zero_grad()`` does) and
    back-propagates; it returns the detached ``loss`` and ``output``."""

    def __init__(self, model: nn.Module, runtime: Runtime) -> None:
        self.model, self.runtime = model, runtime
        self.steps_run = 0

    def train(self, mode: bool = True) -> "ClassifierStep":
        self.model.train(mode)
        return self

    def compute_gradients(self, inputs: torch.Tensor, targets: torch.Tensor, *, cached: Any = None) -> dict:
        with self.runtime.autocast():
            logits = self.model(inputs)
            loss = F.cross_entropy(logits.float(), targets)
        for p in self.model.parameters():
            p.grad = None
        loss.backward()
        self.steps_run += 1
        return {"loss": loss.detach(), "output": logits.detach()}


class Batches(Protocol):
    """A phase's training batches, one evaluation round at a time."""

    def round_end(self, first: int) -> int:
        """The last step (from 1) of the round that starts after step ``first`` (from 0)."""

    def batches(self, first: int, end: int) -> Iterable[tuple]:
        """The batches of steps ``first + 1 .. end``: ``(inputs, targets)`` or ``(inputs, targets, indices)``."""


@dataclass
class StreamBatches:
    """Batches from :func:`jacplug.training.plan.batch_stream`: step ``k``'s batch depends only on the seed
    and ``k``, so a resumed phase regenerates it. ``rounds``: ``"evaluation"`` ends a round at each
    evaluation point of the plan (``jacplug train``'s student), ``"whole"`` runs the plan in one round (an
    experiment cell, evaluated once at its end)."""

    dataset: Dataset
    plan: StepPlan
    batch_size: int
    seed: int
    workers: int
    pin_memory: bool
    start: int = 0
    rank: int = 0
    world_size: int = 1
    rounds: str = "evaluation"
    generator: torch.Generator | None = None
    _stream: Iterator[list[int]] | None = None

    def round_end(self, first: int) -> int:
        return self.plan.total if self.rounds == "whole" else self.plan.next_evaluation(first)

    def batches(self, first: int, end: int) -> Iterable[tuple]:
        if self._stream is None:
            self._stream = batch_stream(len(self.dataset), self.batch_size, self.seed, start=first, rank=self.rank,
                                        world_size=self.world_size)
        return DataLoader(self.dataset, batch_sampler=list(itertools.islice(self._stream, end - first)),
                          num_workers=self.workers, pin_memory=self.pin_memory, generator=self.generator)


class _ResumableBatches(Sampler):
    """torch's shuffling batch sampler (what ``DataLoader(shuffle=True)`` builds), whose next pass can leave
    out the batches a resumed epoch already ran: they are drawn, not loaded, so the pass and the generator
    end exactly as an uninterrupted pass would."""

    def __init__(self, batches: BatchSampler) -> None:
        self.inner, self.skip = batches, 0

    def __iter__(self) -> Iterator[list[int]]:
        skip, self.skip = self.skip, 0
        return itertools.islice(iter(self.inner), skip, None)

    def __len__(self) -> int:
        return len(self.inner)


class EpochBatches:
    """Batches of seeded, shuffled passes over ``dataset``, as one ``DataLoader(shuffle=True,
    generator=generator)`` gives them (the teacher's): ``batch_size`` images a step, each pass's
    incomplete last batch dropped when the data holds more than one batch; a capped epoch
    (``--max-steps-per-epoch``) stops early. A round is an epoch.

    Resumable: with ``generator`` in the state of :meth:`resume_generator`, a phase resumed after ``step``
    gets the batches (and the generator draws) the uninterrupted phase would have."""

    def __init__(self, dataset: Dataset, batch_size: int, generator: torch.Generator, workers: int = 0,
                 plan: StepPlan | None = None) -> None:
        self.generator = generator
        #: the phase's plan; may be set after construction, since an epoch's length is ``len(self)``
        self.plan = plan
        drop_last = len(dataset) > batch_size
        self.sampler = _ResumableBatches(BatchSampler(RandomSampler(dataset, generator=generator), batch_size,
                                                      drop_last))
        self.loader = DataLoader(dataset, batch_sampler=self.sampler, num_workers=workers, generator=generator)
        self._pass_start: torch.Tensor | None = None

    def __len__(self) -> int:
        """Batches in one whole pass over the data."""
        return len(self.loader)

    def round_end(self, first: int) -> int:
        return min((first // self.plan.steps_per_epoch + 1) * self.plan.steps_per_epoch, self.plan.total)

    def batches(self, first: int, end: int) -> Iterable[tuple]:
        ran = first % self.plan.steps_per_epoch  # steps of this epoch run before the phase was resumed
        if ran == 0 or self._pass_start is None:  # a new pass, or the resumed one (from a restored generator)
            self._pass_start = self.generator.get_state()
        self.sampler.skip = ran
        # a whole pass iterates the loader to its end; a capped epoch a slice of a fresh pass
        return self.loader if ran + end - first == len(self.loader) else itertools.islice(self.loader, end - first)

    def resume_generator(self, step: int) -> torch.Generator:
        """A copy of the generator as a phase resumed after ``step`` must start with: the state its
        epoch's pass was drawn from (mid-epoch), or the current one (at an epoch's end)."""
        copy = torch.Generator()
        at_epoch_end = step % self.plan.steps_per_epoch == 0 or self._pass_start is None
        copy.set_state(self.generator.get_state() if at_epoch_end else self._pass_start)
        return copy


@dataclass
class Position:
    """Where a phase stands; what ``resume.safetensors`` stores. ``sums``/``count``: the running sums of
    the step metrics since the last evaluation; ``best``: the scores of the best evaluation so far."""

    step: int = 0
    best_acc: float = -1.0
    best: dict[str, Any] = field(default_factory=dict)
    sums: dict[str, float] = field(default_factory=dict)
    count: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {"step": self.step, "best_acc": self.best_acc, "best": self.best, "sums": self.sums,
                "count": self.count}

    @classmethod
    def from_dict(cls, saved: dict[str, Any]) -> "Position":
        return cls(step=int(saved.get("step", 0)), best_acc=float(saved.get("best_acc", -1.0)),
                   best=dict(saved.get("best", {})), sums=dict(saved.get("sums", {})), count=int(saved.get("count", 0)))


@dataclass
class Loop:
    """One phase's loop. ``evaluate(step) -> metrics`` scores the model (accuracies, agreement);
    ``on_non_finite``: ``"raise"`` (a one-line error ending with ``remedy``) or ``"stop"`` (the phase ends
    where it is and :attr:`diverged_at` says where: an experiment cell scores a diverged weight as it stands);
    ``save_state()`` writes the resume state (every ``save_every`` steps and after every evaluation);
    ``checkpoints``: the files an evaluation asks the checkpoint writer for (``{role: path}``; none: no
    checkpoints)."""

    step: StepObject
    batches: Batches
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    plan: StepPlan
    runtime: Runtime
    events: Events
    evaluate: Callable[[int], dict[str, Any]]
    position: Position = field(default_factory=Position)
    cache: Any = None  # jacplug.training.teacher_cache.TeacherCache or None
    on_non_finite: str = "raise"
    remedy: str = "lower --lr or the weights of the loss terms"
    save_every: int = 0
    save_state: Callable[[], None] | None = None
    checkpoints: dict[str, Path] | None = None
    diverged_at: int | None = None
    #: the values of the last step computed (the non-finite one, when the phase stopped there)
    last_values: dict[str, float] = field(default_factory=dict)
    throughput: dict[str, float] = field(default_factory=lambda: {"seconds": 0.0, "images": 0})
    _fallback_reported: bool = False

    @property
    def images_per_s(self) -> float | None:
        """Training images per second of the steps after the first :data:`~.steps.WARMUP_STEPS`, without data
        loading and evaluations (``None`` for a shorter phase)."""
        seconds = self.throughput["seconds"]
        return self.throughput["images"] / seconds if seconds else None

    def run(self, last: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run the plan from ``position.step`` to its end; returns the last evaluation's metrics
        (``last`` when there was nothing left to run)."""
        started = time.perf_counter()
        position, plan = self.position, self.plan
        record = dict(last or {})
        while position.step < plan.total and self.diverged_at is None:
            first = position.step
            end = self.batches.round_end(first)
            self.step.train()
            for batch in self.batches.batches(first, end):
                metrics = self.train_step(*batch)
                if metrics is None:
                    break
                self.events.emit("on_step_end", step=position.step, metrics=metrics)
                if self.save_every and position.step % self.save_every == 0 and position.step < end:
                    self._save()
            if self.diverged_at is None and plan.evaluates_at(position.step):
                record = self._evaluate(started)
        return record

    def train_step(self, inputs: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor | None = None) -> dict | None:
        """One optimisation step; returns ``loss``, each term (unweighted) and ``lr``, or ``None`` when the
        loss was not finite and the phase stops there."""
        runtime = self.runtime
        started = time.perf_counter()
        inputs = inputs.to(runtime.device, non_blocking=True)
        targets = targets.to(runtime.device, non_blocking=True)
        if runtime.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        cached = self.cache.lookup(indices) if self.cache is not None else None
        out = self.step.compute_gradients(inputs, targets, cached=cached)
        values = self.last_values = {k: float(v) for k, v in out.items() if k != "output"}
        # before the update: a non-finite step changes nothing; every rank stops at the same step
        if not self._finite(values):
            return None
        self.optimizer.step()
        self.scheduler.step()
        position = self.position
        position.step += 1
        if getattr(self.step, "steps_run", 0) > WARMUP_STEPS:  # after cuDNN's autotuning and the capture
            self.throughput["seconds"] += time.perf_counter() - started  # values were read: the device is done
            self.throughput["images"] += len(targets)
        self._report_fallback()
        for key, value in values.items():
            position.sums[key] = position.sums.get(key, 0.0) + value
        position.count += 1
        return {**values, "lr": self.optimizer.param_groups[0]["lr"]}

    def _finite(self, values: dict[str, float]) -> bool:
        """Whether the step's loss is finite on every rank; otherwise raise (one line) or record where the
        phase stopped, as ``on_non_finite`` says."""
        step = self.position.step + 1
        bad = {k: v for k, v in values.items() if not math.isfinite(v)}
        elsewhere = any_rank(bool(bad), self.runtime) and not bad
        if not bad and not elsewhere:
            return True
        if self.on_non_finite == "stop":
            self.diverged_at = step
            return False
        where = f" ({bad})" if bad else " on another process"
        raise UserError(f"loss became non-finite at step {step}{where}; {self.remedy}")

    def _report_fallback(self) -> None:
        fallback = getattr(self.step, "capture_fallback", None)
        if fallback and not self._fallback_reported:
            self._fallback_reported = True
            if self.runtime.is_main:
                print(f"jacplug: CUDA graph capture failed, training eagerly: {fallback}", file=sys.stderr)

    def _evaluate(self, started: float) -> dict[str, Any]:
        """The evaluation after the current step: mean step metrics since the last one, the phase's scores,
        the best score so far, checkpoints, the resume state; returns the metrics."""
        position, plan = self.position, self.plan
        step = position.step
        count = max(position.count, 1)
        metrics: dict[str, Any] = {"step": step, "images": step * plan.batch,
                                   "train_loss": position.sums.get("loss", 0.0) / count}
        metrics.update({k: v / count for k, v in position.sums.items() if k != "loss"})
        metrics.update(self.evaluate(step))
        metrics["time_s"] = round(time.perf_counter() - started, 3)
        accuracies = {k: v for k, v in metrics.items() if k.endswith("_acc")}
        scores = {"epoch": plan.epoch_of(step), "step": step, **accuracies}
        score = accuracies.get("val_acc", accuracies.get("test_acc"))
        improved = score is not None and score > position.best_acc
        if improved:
            position.best_acc, position.best = score, scores
        self.events.emit("on_epoch_end", epoch=plan.epoch_of(step), metrics=metrics)
        if self.checkpoints is not None:
            files = {role: path for role, path in self.checkpoints.items() if role != "best" or improved}
            self.events.emit("on_checkpoint", step=step, metrics=scores, files=files)
        position.sums, position.count = {}, 0
        self._save()
        return metrics

    def _save(self) -> None:
        if self.save_state is not None:
            self.save_state()
