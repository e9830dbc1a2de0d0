"""What the bridge's forward procedures hand to its loss adapters, riding on the models' outputs.

Why on the output tensor: torchdistill's mid-level losses receive only ``(student_io_dict,
teacher_io_dict, targets)``; the input batch, the models and the teacher's on-graph logits never
reach them. The one object that travels from a forward procedure to every loss unchanged is the
model's output, stored as ``io_dict['.']['output']``, so the forward procedures attach a
:class:`StepRecord` to it under :data:`RECORD_ATTR`. No reference cycle is formed (the teacher's
record sits on a detached copy of its logits), so each step's graph is freed as soon as the step
ends.

This module imports only torch and jacplug, so the adapters can be tested without torchdistill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor, nn

from jacplug.errors import UserError

class BridgeConfigError(UserError, ValueError):
    """A torchdistill config the bridge cannot run as written; the message names the setting to change.

    A :class:`~jacplug.errors.UserError` (one line, exit code 2 from the bridge's runner) and a
    ``ValueError``, which is what torchdistill raises for its own configuration problems.
    """


RECORD_ATTR = "jacplug_step"
INPUTS_ATTR = "jacplug_inputs"
STUDENT_PROC = "jacplug_student_input_grad"
TEACHER_PROC = "jacplug_teacher_input_grad"


@dataclass
class StepRecord:
    """One model's part of a step.

    ``inputs``: the batch ``[B, *S]`` as a leaf that requires grad (see :func:`input_leaf`), shared
    by teacher and student (the Jacobian terms differentiate both models' logits w.r.t. this one
    tensor). ``fn``: the model as a callable for terms that re-run it (forward mode, finite
    differences, noisy copies), in full precision and without moving BatchNorm's running statistics
    (:func:`jacplug.losses.extra_evaluation.extra_evaluation`). ``model``: the model itself, for messages.
    ``graph_logits`` (teacher only): the teacher's logits ``[B, C]`` with a graph to ``inputs``
    (``None`` when the teacher ran without grad). ``cache`` (teacher only): shared by every jacplug
    term of the step, so teacher Jacobian rows are computed once and the teacher's graph is consumed
    at most once.
    """

    inputs: Tensor
    fn: Callable[[Tensor], Tensor]
    model: nn.Module | None = None
    graph_logits: Tensor | None = None
    cache: dict[str, Any] = field(default_factory=dict)


def attach(output: Tensor, record: StepRecord) -> Tensor:
    setattr(output, RECORD_ATTR, record)
    return output


def record_of(output: Any) -> StepRecord | None:
    return getattr(output, RECORD_ATTR, None)


def input_leaf(sample_batch: Tensor) -> Tensor:
    """The leaf ``[B, *S]`` that requires grad and that both models of this step run on.

    Why not ``sample_batch.requires_grad_(True)``: that would change the caller's tensor (later
    in-place edits of the batch would fail, and it would fill ``sample_batch.grad``). Instead the
    first forward procedure of a step makes a detached alias (same storage, no copy) and hangs it on
    the batch under :data:`INPUTS_ATTR`, so the other procedure, which receives the same batch
    object, finds the same leaf. The batch's own ``requires_grad`` and ``grad`` never change.
    """
    leaf = getattr(sample_batch, INPUTS_ATTR, None)
    if leaf is None:
        leaf = sample_batch.detach().requires_grad_(True)
        setattr(sample_batch, INPUTS_ATTR, leaf)
    return leaf
