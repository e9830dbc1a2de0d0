"""How long a training phase runs, counted in optimizer steps, and which samples each step sees.

One implementation for ``jacplug train`` (student and teacher phases) and ``jacplug experiment``, so a
cell of the few-sample experiment is one ``jacplug train --steps N`` run.

Length. A phase runs either ``epochs`` passes over its data or ``steps`` optimizer steps (never both).
An epoch is ``ceil(samples / batch)`` steps, capped by ``--max-steps-per-epoch``. The cosine
learning-rate schedule, checkpoints, ``--save-every``, resume and ``metrics.jsonl`` count steps.

Why steps matter: with few images an epoch is one or two steps, so an epoch budget gives the student
almost no updates (10 images per class, batch 64: 2 steps per epoch, 8 in 4 epochs). Without
``--epochs`` or ``--steps``, ``--samples-per-class`` therefore switches the default from
:data:`DEFAULT_EPOCHS` epochs to :data:`FEW_SAMPLE_STEPS` steps whenever the epochs would make fewer
(:func:`default_length`; docs/pipeline.md reports the validation sweep that chose the number).

Batches (:func:`batch_stream`): consecutive seeded permutations of the training indices, cut into
batches of ``min(batch_size * world_size, samples)``. Every step sees a full batch, even when the data
is smaller than one batch or not a multiple of it (a trailing batch of 4 images would be a noisy step,
one of a single image cannot be normalised by train-mode BatchNorm); over a run every image is seen
equally often (within one), though a batch that straddles two permutations may hold an image twice.
Step ``k``'s batch depends only on the seed and ``k``, so a resumed run regenerates it. Under DDP each process takes every
``world_size``-th index of the step's batch, so ``--batch-size`` stays per process.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from dataclasses import dataclass
from typing import Iterator

import torch

from ..errors import UserError

#: the student's and the teacher's epochs when neither epochs nor steps are given
DEFAULT_EPOCHS = 4
#: the student's default step budget when --samples-per-class leaves DEFAULT_EPOCHS epochs shorter
#: (chosen on the validation split of the embedded digits; docs/pipeline.md has the sweep)
FEW_SAMPLE_STEPS = 150
#: fewer optimizer steps than this get a warning ("a few dozen")
FEW_STEPS = 30
#: with a step budget, evaluations (and student checkpoints) happen at most this many times, at epoch ends
MAX_EVALUATIONS = 10
#: steps of a process left out of a phase's images/s figure: cuDNN autotunes in the first steps, and
#: the student's CUDA graph is captured after three eager warm-up steps
WARMUP_STEPS = 4


class FewStepsWarning(UserWarning):
    """A phase will make so few optimizer steps that the model can barely learn."""


@dataclass(frozen=True)
class StepPlan:
    """The length of one phase. ``batch``: images per optimizer step, all processes together;
    ``eval_every``: steps between evaluations (the last step is always evaluated)."""

    samples: int
    batch: int
    steps_per_epoch: int
    total: int
    eval_every: int
    #: processes whose shares make up each step's ``batch`` (torchrun's world size)
    processes: int = 1

    @property
    def images(self) -> int:
        """Images seen over the whole phase (repeats counted)."""
        return self.total * self.batch

    @property
    def epochs(self) -> int:
        """Epochs begun (the last one may be cut short by a step budget)."""
        return math.ceil(self.total / self.steps_per_epoch)

    def epoch_of(self, step: int) -> int:
        """The epoch (from 1) that optimizer step ``step`` (from 1) belongs to."""
        return (max(step, 1) - 1) // self.steps_per_epoch + 1

    def evaluates_at(self, step: int) -> bool:
        """Whether the phase evaluates after optimizer step ``step`` (from 1)."""
        return step == self.total or step % self.eval_every == 0

    def next_evaluation(self, step: int) -> int:
        """The first step after ``step`` (from 0) at which the phase evaluates."""
        return min(self.total, (step // self.eval_every + 1) * self.eval_every)

    def describe(self) -> str:
        """``"150 optimizer steps x 64 images = 9,600 images seen (96.0 passes over 100 images)"``; under
        torchrun the batch is the global one, which says why the run makes fewer steps per epoch."""
        shared = (f" (global batch: {self.processes} processes x {math.ceil(self.batch / self.processes)})"
                  if self.processes > 1 else "")
        return (f"{self.total:,} optimizer steps x {self.batch} images{shared} = {self.images:,} images seen "
                f"({self.images / self.samples:.1f} passes over {self.samples:,} images)")


def stream_batch(samples: int, batch_size: int, world_size: int = 1) -> int:
    """Images per step of :func:`batch_stream`: ``min(batch_size * world_size, samples)``."""
    batch = min(batch_size * world_size, samples)
    if batch < 2 * world_size:
        raise UserError(
            f"the training split has {samples} sample(s); every process needs at least 2 per batch "
            f"(train-mode BatchNorm cannot normalise a single sample)"
        )
    return batch


def plan_steps(
    *,
    samples: int,
    batch: int,
    steps_per_epoch: int,
    epochs: int | None = None,
    steps: int | None = None,
    max_steps_per_epoch: int | None = None,
) -> StepPlan:
    """The plan of a phase of ``epochs`` epochs or ``steps`` steps (exactly one of them given).

    ``steps_per_epoch``: batches in one pass over the data, before the ``max_steps_per_epoch`` cap.
    With epochs every epoch end is evaluated; with a step budget at most :data:`MAX_EVALUATIONS`
    evaluations are spread over the epoch ends (a 2-step epoch evaluated 75 times would spend more
    time evaluating and writing checkpoints than training).
    """
    if (epochs is None) == (steps is None):
        raise ValueError("give exactly one of epochs and steps")
    per_epoch = max(1, min(steps_per_epoch, max_steps_per_epoch or steps_per_epoch))
    if steps is None:
        return StepPlan(samples, batch, per_epoch, epochs * per_epoch, per_epoch)
    epochs_begun = math.ceil(steps / per_epoch)
    eval_every = per_epoch * max(1, math.ceil(epochs_begun / MAX_EVALUATIONS))
    return StepPlan(samples, batch, per_epoch, steps, eval_every)


def stream_plan(
    samples: int,
    batch_size: int,
    *,
    epochs: int | None = None,
    steps: int | None = None,
    max_steps_per_epoch: int | None = None,
    world_size: int = 1,
) -> StepPlan:
    """:func:`plan_steps` for the batches of :func:`batch_stream`."""
    batch = stream_batch(samples, batch_size, world_size)
    plan = plan_steps(samples=samples, batch=batch, steps_per_epoch=math.ceil(samples / batch), epochs=epochs,
                      steps=steps, max_steps_per_epoch=max_steps_per_epoch)
    return dataclasses.replace(plan, processes=world_size)


def default_length(steps_per_epoch: int, few_samples: bool, max_steps_per_epoch: int | None = None) -> tuple[int | None, int | None]:
    """``(epochs, steps)`` of the student when the user gave neither.

    :data:`DEFAULT_EPOCHS` epochs, unless ``few_samples`` (``--samples-per-class`` was given) and those
    epochs would make fewer than :data:`FEW_SAMPLE_STEPS` steps: then the step budget.
    """
    per_epoch = min(steps_per_epoch, max_steps_per_epoch or steps_per_epoch)
    if few_samples and DEFAULT_EPOCHS * per_epoch < FEW_SAMPLE_STEPS:
        return None, FEW_SAMPLE_STEPS
    return DEFAULT_EPOCHS, None


def batch_stream(samples: int, batch_size: int, seed: int, *, start: int = 0, rank: int = 0,
                 world_size: int = 1) -> Iterator[list[int]]:
    """Endless batches of indices into ``range(samples)`` for this process, from step ``start`` on.

    The global batch of every step is ``stream_batch(samples, batch_size, world_size)`` indices taken
    in order from consecutive permutations drawn with a generator seeded with ``seed``; this process
    gets ``batch[rank::world_size]``. Skipping ``start`` steps draws the same permutations without
    loading any sample.
    """
    size = stream_batch(samples, batch_size, world_size)
    generator = torch.Generator().manual_seed(seed)
    pending: list[int] = []
    step = 0
    while True:
        while len(pending) < size:
            pending.extend(torch.randperm(samples, generator=generator).tolist())
        if step >= start:
            yield pending[:size][rank::world_size]
        pending = pending[size:]
        step += 1


def warn_if_few(plan: StepPlan, phase: str, option: str) -> None:
    """One-line :class:`FewStepsWarning` when ``plan`` makes fewer than :data:`FEW_STEPS` steps."""
    if plan.total < FEW_STEPS:
        warnings.warn(
            f"the {phase} will make only {plan.total} optimizer step{'s' if plan.total != 1 else ''} "
            f"({plan.samples:,} training images, {plan.batch} per step, {plan.epochs} epoch"
            f"{'s' if plan.epochs != 1 else ''}); pass {option} N for more updates",
            FewStepsWarning,
            stacklevel=2,
        )
