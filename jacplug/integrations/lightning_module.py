"""``DistillationModule``: a Lightning ``LightningModule`` whose training step is a :class:`jacplug.Distiller`.

Lightning has no built-in distillation: users write a ``LightningModule``. This one is that module,
so that Lightning's own machinery carries the Jacobian step: its strategies (``"ddp"`` over several
processes or machines), precision plugins (``"bf16-mixed"``: the forward passes run under its
autocast, the loss terms outside it), gradient accumulation and clipping, loggers and checkpoints.

The module's parameters are the Distiller's, the student's and the loss terms' adapters (never the
teacher's), so Lightning's DDP averages the adapters' gradients with the student's and its
checkpoints hold both; the teacher is frozen and moves with the module. ``forward(x)`` is the
student's, for inference and ``validation_step``, which logs the student's cross-entropy and accuracy.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..distiller import Distiller
from ..errors import UserError
from ..losses.composite import WeightedLoss
from ..outputs import logits_of

try:
    import lightning as L
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("jacplug.integrations.lightning_module needs Lightning: pip install 'jacplug[lightning]'") from exc

OptimizerFactory = Callable[[Iterable[Tensor]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class DistillationModule(L.LightningModule):
    """``DistillationModule(student, teacher, loss=[...], optimizer=...)``.

    ``loss``: jacplug's spec strings, a ``{name: weight}`` dict or a ``WeightedLoss`` (default: the
    preset). ``optimizer``: a callable from parameters to an optimizer (default AdamW, lr 1e-3), e.g.
    ``functools.partial(torch.optim.SGD, lr=0.1)``; ``lr_scheduler``: optionally a callable from the
    optimizer to a scheduler stepped every optimizer step. Batches are ``(images, labels)`` tuples or
    dicts with ``input_key`` and ``label_key``. Each term is logged with ``self.log`` under
    ``train/<term>`` (and ``train/loss``), per step and per epoch.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        loss: WeightedLoss | Sequence[str] | Mapping[str, float] | None = None,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        *,
        input_key: str = "pixel_values",
        label_key: str = "labels",
        check_gradients: bool = True,
        teacher_input: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        for name, factory, example in (("optimizer", optimizer, "functools.partial(torch.optim.SGD, lr=0.1)"),
                                       ("lr_scheduler", lr_scheduler,
                                        "functools.partial(torch.optim.lr_scheduler.StepLR, step_size=10)")):
            if factory is not None and not callable(factory):
                raise UserError(f"{name}= takes a callable that builds it, e.g. {example}; got "
                                f"{type(factory).__name__} {factory!r}")
        self.distiller = Distiller(student, teacher, loss, amp=False, check_gradients=check_gradients,
                                   name=type(student).__name__, teacher_input=teacher_input)
        self.optimizer_factory = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-3))
        self.scheduler_factory = lr_scheduler
        self.input_key, self.label_key = input_key, label_key

    @property
    def student(self) -> nn.Module:
        return self.distiller.student

    def forward(self, images: Tensor) -> Tensor:
        return logits_of(self.student(images), "student")

    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        images, labels = self._split(batch)
        out = self.distiller(images, labels)
        size = images.shape[0]
        self.log("train/loss", out["loss"].detach(), prog_bar=True, on_step=True, on_epoch=True, batch_size=size)
        for key in self.distiller.loss.terms:
            self.log(f"train/{key}", out[key].detach(), on_step=True, on_epoch=True, batch_size=size)
        return out["loss"]

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        images, labels = self._split(batch)
        logits = self(images)
        if labels is None:
            return
        self.log("val/loss", F.cross_entropy(logits.float(), labels), prog_bar=True, sync_dist=True,
                 batch_size=images.shape[0])
        self.log("val/acc", (logits.argmax(1) == labels).float().mean(), prog_bar=True, sync_dist=True,
                 batch_size=images.shape[0])

    def configure_optimizers(self) -> Any:
        optimizer = self.optimizer_factory(self.distiller.trainable_parameters())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = self.scheduler_factory(optimizer)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def _split(self, batch: Any) -> tuple[Tensor, Tensor | None]:
        if isinstance(batch, Mapping):
            if self.input_key not in batch:
                raise UserError(f"the batch has no {self.input_key!r} (it has {sorted(batch)}); pass input_key=")
            return batch[self.input_key], batch.get(self.label_key)
        if isinstance(batch, (tuple, list)) and batch:
            return batch[0], (batch[1] if len(batch) > 1 else None)
        if isinstance(batch, Tensor):
            return batch, None
        raise UserError(f"a batch must be (images, labels), a dict with {self.input_key!r}, or images; "
                        f"got {type(batch).__name__}")
