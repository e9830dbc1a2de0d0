"""What the student's forward procedure hands to the loss adapters: the Distiller's result, riding on the
student's output.

Why on the output tensor: torchdistill's mid-level losses receive only ``(student_io_dict,
teacher_io_dict, targets)``; the input batch and the models never reach them. The one object that travels
from a forward procedure to every loss unchanged is the model's output, stored as
``io_dict['.']['output']``, so the student's forward procedure attaches the :class:`jacplug.Distiller`'s
result (``{"loss", "output", <term key>: value}``) to it under :data:`RESULT_ATTR`.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from ...errors import UserError


class BridgeConfigError(UserError, ValueError):
    """A torchdistill config the bridge cannot run as written; the message names the setting to change.

    A :class:`~jacplug.errors.UserError` (one line, exit code 2 from the bridge's runner) and a
    ``ValueError``, which is what torchdistill raises for its own configuration problems.
    """


RESULT_ATTR = "jacplug_result"
STUDENT_PROC = "jacplug_student_input_grad"
TEACHER_PROC = "jacplug_teacher_input_grad"
PRE_EPOCH_PROC = "jacplug_pre_epoch_process"


def attach(output: Tensor, result: dict[str, Tensor]) -> Tensor:
    setattr(output, RESULT_ATTR, result)
    return output


def result_of(output: Any) -> dict[str, Tensor] | None:
    return getattr(output, RESULT_ATTR, None)
