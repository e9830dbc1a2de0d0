"""What the bridge's forward procedures hand to its loss adapters, riding on the models' outputs.

Why on the output tensor: torchdistill's mid-level losses receive only ``(student_io_dict,
teacher_io_dict, targets)``; the input batch, the models and the teacher's on-graph logits never
reach them. The one object that travels from a forward procedure to every loss unchanged is the
model's output, stored as ``io_dict['.']['output']``, so the forward procedures attach a
:class:`StepRecord` to it under :data:`RECORD_ATTR`. No reference cycle is formed (the teacher's
record sits on a detached copy of its logits), so each step's graph is freed as soon as the step
ends.

This module imports only torch, so the adapters can be tested without torchdistill.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from torch import Tensor

RECORD_ATTR = "jacplug_step"
STUDENT_PROC = "jacplug_student_input_grad"
TEACHER_PROC = "jacplug_teacher_input_grad"


@dataclass
class StepRecord:
    """One model's part of a step.

    ``inputs``: the batch ``[B, *S]``, requiring grad, shared by teacher and student (the Jacobian
    terms differentiate both models' logits w.r.t. this one tensor). ``fn``: the model as a callable,
    for terms that re-run it (forward mode, finite differences, noisy copies). ``graph_logits``
    (teacher only): the teacher's logits ``[B, C]`` with a graph to ``inputs`` (``None`` when the
    teacher ran without grad). ``cache`` (teacher only): shared by every jacplug term of the step,
    so teacher Jacobian rows are computed once and the teacher's graph is consumed at most once.
    """

    inputs: Tensor
    fn: Callable[[Tensor], Tensor]
    graph_logits: Tensor | None = None
    cache: dict[str, Any] = field(default_factory=dict)


def attach(output: Tensor, record: StepRecord) -> Tensor:
    setattr(output, RECORD_ATTR, record)
    return output


def record_of(output: Any) -> StepRecord | None:
    return getattr(output, RECORD_ATTR, None)
