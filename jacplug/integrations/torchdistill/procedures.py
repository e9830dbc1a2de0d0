"""torchdistill's forward procedures and pre-epoch process for a step that is one :class:`jacplug.Distiller`.

torchdistill calls the teacher's forward procedure, then the student's, then the criterion, and hands
each procedure one model only. The Distiller needs both models and the loss terms, so the pre-epoch
process (``jacplug_pre_epoch_process``), which receives torchdistill's box, builds it from the box's
student, teacher and the jacplug terms of its criterion, and binds it to the student. The student's
procedure then runs the whole step (inputs that require grad, the frozen teacher's rows, the student
double-differentiable where a term needs it, the first-call checks) and returns the student's logits,
on the graph, with the Distiller's result attached for the loss adapters
(:mod:`jacplug.integrations.torchdistill.losses`). The teacher's procedure only runs the frozen teacher
for torchdistill's own losses and feature hooks, as torchdistill runs it.
"""

from __future__ import annotations

from typing import Any, Iterator

from torch import Tensor, nn
from torchdistill.core.interfaces.registry import PRE_EPOCH_PROC_FUNC_DICT

from ...distiller import Distiller
from ...losses.composite import WeightedLoss
from .losses import JacplugLoss
from .step import PRE_EPOCH_PROC, STUDENT_PROC, TEACHER_PROC, BridgeConfigError, attach

BOUND_ATTR = "jacplug_distiller"


def pre_epoch_process(self: Any, epoch: int | None = None, **kwargs: Any) -> None:
    """torchdistill pre-epoch process (``pre_epoch_process: 'jacplug_pre_epoch_process'``): binds the step's
    Distiller to the box's student (once per criterion), then runs torchdistill's default pre-epoch process."""
    adapters = list(_jacplug_losses(self.criterion))
    student = getattr(self.student_model, "module", self.student_model)
    bound = getattr(student, BOUND_ATTR, ())
    if adapters and not (bound and bound[1] is self.criterion):
        keys: dict[str, int] = {}
        for adapter in adapters:  # a term used twice (say, two weights) gets a key of its own
            keys[adapter.term.name] = keys.get(adapter.term.name, 0) + 1
            adapter.key = adapter.term.name + (f"-{keys[adapter.term.name]}" if keys[adapter.term.name] > 1 else "")
        loss = WeightedLoss({adapter.key: (adapter.term, 1.0) for adapter in adapters})  # torchdistill weighs them
        distiller = Distiller(self.student_model, self.teacher_model, loss, amp=False, name=type(student).__name__)
        object.__setattr__(student, BOUND_ATTR, (distiller, self.criterion))  # not a sub-module of the student
    PRE_EPOCH_PROC_FUNC_DICT["default_pre_epoch_process_with_teacher"](self, epoch=epoch, **kwargs)


def _jacplug_losses(criterion: Any) -> Iterator[JacplugLoss]:
    """The jacplug losses in a torchdistill criterion: its sub-modules, and the sub-terms of a
    ``WeightedSumLoss``, which keeps them in a plain dict (``term_dict``, name -> (criterion, weight))."""
    seen: set[int] = set()
    stack = [criterion]
    while stack:
        node = stack.pop()
        if id(node) in seen or not isinstance(node, nn.Module):
            continue
        seen.add(id(node))
        if isinstance(node, JacplugLoss):
            yield node
        stack.extend(node.children())
        stack.extend(sub for sub, _ in getattr(node, "term_dict", {}).values())


def student_forward(model: nn.Module, sample_batch: Tensor, targets: Any = None, supp_dict: Any = None,
                    **_: Any) -> Tensor:
    """Student forward procedure: the bound Distiller's step; returns its student logits ``[B, C]`` (on the
    graph) carrying the whole result for the loss adapters."""
    bound = getattr(getattr(model, "module", model), BOUND_ATTR, ())
    if not bound:
        raise BridgeConfigError(
            f"{STUDENT_PROC!r} runs the Distiller that {PRE_EPOCH_PROC!r} builds from the box's jacplug losses, but "
            f"none is bound to this student; set `pre_epoch_process: {PRE_EPOCH_PROC!r}` under train in the "
            f"torchdistill config (or, with no jacplug loss in the criterion, torchdistill's own forward procedure)"
        )
    if not isinstance(sample_batch, Tensor) or not sample_batch.is_floating_point():
        got = type(sample_batch).__name__ + (f" {sample_batch.dtype}" if isinstance(sample_batch, Tensor) else "")
        raise BridgeConfigError(f"jacplug's forward procedures need the sample batch as a floating-point tensor "
                                f"[B, *S], got {got}")
    result = bound[0](sample_batch, targets)
    return attach(result["output"], result)


def teacher_forward(model: nn.Module, sample_batch: Tensor, targets: Any = None, supp_dict: Any = None,
                    **_: Any) -> Tensor:
    """Teacher forward procedure: the frozen teacher in eval mode (torchdistill runs it without grad), for
    torchdistill's own losses and feature hooks; the Distiller takes the teacher's rows itself."""
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if trainable:
        raise BridgeConfigError(
            f"{TEACHER_PROC!r} needs a frozen teacher, but {len(trainable)} teacher parameter(s) require grad "
            f"(e.g. {trainable[0]!r}); set `requires_grad: False` under train.teacher in the config"
        )
    if model.training:
        model.eval()  # BatchNorm in train mode would couple the samples' Jacobians
    return model(sample_batch)
