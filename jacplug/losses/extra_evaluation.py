"""Models as callables for the terms that evaluate them again (forward mode, finite differences, noise).

Those extra evaluations are not training forward passes: they must not move train-mode BatchNorm's
running statistics (a perturbed ``x + h u`` or a noisy copy would otherwise count as a real batch,
and ``k`` directions would count ``k`` times), and they must run in full precision (under bf16
autocast a finite difference of two nearby outputs is rounding noise). :func:`extra_evaluation`
wraps a model so both hold; the training pipeline hands terms such callables as ``student_fn`` and
``teacher_fn``, and a user's own loop can do the same.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase

from ..outputs import at_least_float32, logits_of

RUNNING_STATS = ("running_mean", "running_var", "num_batches_tracked")


@contextlib.contextmanager
def isolated_running_stats(model: nn.Module) -> Iterator[None]:
    """Inside, norm layers update throw-away copies of their running statistics; on exit the
    original buffers are back, untouched.

    Why swap in copies rather than restore values afterwards: train-mode ``batch_norm`` saves the
    running buffers for its backward, so writing the old values back in place would fail the
    backward's version check; the copies are what that backward keeps.
    """
    saved: list[tuple[nn.Module, str, Tensor]] = []
    for module in model.modules():
        if isinstance(module, _NormBase) and module.track_running_stats:
            for name in RUNNING_STATS:
                buffer = getattr(module, name, None)
                if buffer is not None:
                    saved.append((module, name, buffer))
                    setattr(module, name, buffer.clone())
    try:
        yield
    finally:
        for module, name, buffer in saved:
            setattr(module, name, buffer)


def extra_evaluation(model: nn.Module) -> Callable[[Tensor], Tensor]:
    """``x -> logits [B, C]`` in the model's own precision (autocast off, logits of at least float32,
    :mod:`jacplug.outputs`), with running statistics left untouched: the callable to pass as
    ``student_fn`` / ``teacher_fn``."""

    def call(x: Tensor) -> Tensor:
        with torch.autocast(x.device.type, enabled=False), isolated_running_stats(model):
            return at_least_float32(logits_of(model(x)))

    return call
