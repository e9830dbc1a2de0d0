"""``DistillationModule``: a Lightning ``LightningModule`` whose training step is a :class:`jacplug.Distiller`.

Lightning has no built-in distillation: users write a ``LightningModule``. This one is that module,
so that Lightning's own machinery carries the Jacobian step: its strategies (``"ddp"`` over several
processes or machines), precision plugins (``"bf16-mixed"``: the forward passes run under its
autocast, the loss terms outside it), gradient accumulation and clipping, loggers and checkpoints.

The module's parameters are the Distiller's, the student's and the loss terms' adapters (never the
teacher's), so Lightning's DDP averages the adapters' gradients with the student's and its
checkpoints hold both; the teacher is frozen and moves with the module. ``forward(x)`` is the
student's, for inference and ``validation_step``, which logs the student's cross-entropy and accuracy.

Checkpoints: a module built from names (a registered model name, or the path of a ``jacplug train``
checkpoint) records them as hyperparameters, so ``DistillationModule.load_from_checkpoint(path)``
rebuilds it; one built from modules needs them again (``load_from_checkpoint(path, student=...,
teacher=...)``). :func:`student_state_dict` gives the student's own ``state_dict`` from a checkpoint
file, loadable into the bare model.
"""

from __future__ import annotations

import pickle
from pathlib import Path
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

#: where the student's weights sit in the module's state_dict
STUDENT_PREFIX = "distiller.student."

OptimizerFactory = Callable[[Iterable[Tensor]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class DistillationModule(L.LightningModule):
    """``DistillationModule(student, teacher, loss=[...], optimizer=...)``.

    ``student`` and ``teacher``: modules, or names: a model name of jacplug's registry (any timm model),
    built with ``student_kwargs`` / ``teacher_kwargs`` (e.g. ``{"num_classes": 10}``), or the path of a
    ``jacplug train`` checkpoint (the model it records, with its weights). Names, spec-string losses and
    the keys are saved as hyperparameters, so ``load_from_checkpoint(path)`` needs nothing else.

    ``loss``: jacplug's spec strings, a ``{name: weight}`` dict or a ``WeightedLoss`` (default: the
    preset). ``optimizer``: a callable from parameters to an optimizer (default AdamW, lr 1e-3), e.g.
    ``functools.partial(torch.optim.SGD, lr=0.1)``; ``lr_scheduler``: optionally a callable from the
    optimizer to a scheduler stepped every optimizer step. Batches are ``(images, labels)`` tuples or
    dicts with ``input_key`` and ``label_key``. Each term is logged with ``self.log`` under
    ``train/<term>`` (and the total under ``train/loss``), averaged over the processes
    (``sync_dist=True``): the name a ``ModelCheckpoint(monitor=...)`` or ``EarlyStopping`` watches
    (the step's value during an epoch, the epoch's mean at its end); Lightning's loggers receive
    it as ``train/<term>_step`` and ``train/<term>_epoch``.

    A ``loss`` given as a ``WeightedLoss`` is not a hyperparameter: ``load_from_checkpoint(path,
    loss=...)`` needs it again (a checkpoint without it is refused in one line rather than loaded
    with a different loss).
    """

    def __init__(
        self,
        student: nn.Module | str,
        teacher: nn.Module | str,
        loss: WeightedLoss | Sequence[str] | Mapping[str, float] | None = None,
        optimizer: OptimizerFactory | None = None,
        lr_scheduler: SchedulerFactory | None = None,
        *,
        student_kwargs: Mapping[str, Any] | None = None,
        teacher_kwargs: Mapping[str, Any] | None = None,
        input_key: str = "pixel_values",
        label_key: str = "labels",
        check_gradients: bool = True,
        teacher_input: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        for name, key in (("input_key", input_key), ("label_key", label_key)):
            if not isinstance(key, str):
                raise UserError(f"{name}= names a batch dict's key, a str; got {type(key).__name__} {key!r}")
        for name, factory, example in (("optimizer", optimizer, "functools.partial(torch.optim.SGD, lr=0.1)"),
                                       ("lr_scheduler", lr_scheduler,
                                        "functools.partial(torch.optim.lr_scheduler.StepLR, step_size=10)")):
            if factory is not None and not callable(factory):
                raise UserError(f"{name}= takes a callable that builds it, e.g. {example}; got "
                                f"{type(factory).__name__} {factory!r}")
        # what can rebuild the module: names, spec strings and plain options (modules and callables cannot)
        self.save_hyperparameters(ignore=[key for key, value in (("student", student), ("teacher", teacher),
                                                                ("loss", loss)) if not _recordable(value)]
                                  + ["optimizer", "lr_scheduler", "teacher_input"])
        for key in ("student", "teacher"):  # a path as text: a checkpoint's hyperparameters stay plain for weights_only
            if isinstance(self.hparams.get(key), Path):
                self.hparams[key] = str(self.hparams[key])
        # whether a checkpoint can rebuild the loss: it records the loss only when given as names
        self._loss_recorded, self._loss_given = _recordable(loss), loss is not None
        student = _model(student, student_kwargs, "student")
        teacher = _model(teacher, teacher_kwargs, "teacher")
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
        for key in ("loss", *self.distiller.loss.terms):
            # one name for callbacks (train/loss); loggers get its _step and _epoch values, both averaged over
            # the processes (one scalar all_reduce per term and step under DDP)
            self.log(f"train/{key}", out[key].detach(), prog_bar=key == "loss", on_step=True, on_epoch=True,
                     sync_dist=True, batch_size=size)
        return out["loss"]

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint["jacplug_loss_recorded"] = self._loss_recorded

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Refuse, in one line, a checkpoint whose loss this module does not have: one built with a
        ``WeightedLoss`` (not a hyperparameter) and loaded without ``loss=``, or whose learnable loss
        parts (FitNet adapters) differ from this module's."""
        prefix = "distiller.loss."
        saved = {key for key in checkpoint.get("state_dict", {}) if key.startswith(prefix)}
        own = {key for key in self.state_dict() if key.startswith(prefix)}
        if checkpoint.get("jacplug_loss_recorded") is False and not self._loss_given:
            raise UserError("the checkpoint's module was built with a loss object, which a checkpoint does not "
                            "record; pass it again: DistillationModule.load_from_checkpoint(path, loss=...)")
        if saved != own:
            raise UserError(f"the checkpoint's loss has the learnable parts {sorted(saved) or 'none'}, this module's "
                            f"{sorted(own) or 'none'}; pass the loss it was built with: "
                            f"DistillationModule.load_from_checkpoint(path, loss=...)")

    def student_state_dict(self) -> dict[str, Tensor]:
        """The student's own ``state_dict`` (no ``distiller.student.`` prefix), for the bare model."""
        return self.student.state_dict()

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


def student_state_dict(checkpoint: str | Path | Mapping[str, Any]) -> dict[str, Tensor]:
    """The student's ``state_dict`` from a Lightning checkpoint of a :class:`DistillationModule` (a
    ``.ckpt`` path or the loaded dict): its ``distiller.student.`` keys without the prefix, loadable
    with ``model.load_state_dict`` into the bare student; the adapters and nothing else are left out."""
    if not isinstance(checkpoint, Mapping):
        checkpoint = _load_plain(Path(checkpoint))
    state = checkpoint.get("state_dict", checkpoint)
    student = {key[len(STUDENT_PREFIX):]: value for key, value in state.items() if key.startswith(STUDENT_PREFIX)}
    if not student:
        raise UserError(f"the checkpoint holds no {STUDENT_PREFIX!r} keys (it has {sorted(state)[:3]}...): it is "
                        f"not a DistillationModule's")
    return student


def _load_plain(path: Path) -> Mapping[str, Any]:
    """A checkpoint file unpickled with ``weights_only=True``: tensors and plain containers, which is
    all a Lightning checkpoint holds; a file that would build other objects (and could run code) is
    refused, since the file may come from anyone."""
    if not path.is_file():
        raise UserError(f"no checkpoint file at {path}: pass the path of a DistillationModule's .ckpt")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).strip().splitlines()[0]
        raise UserError(f"{path} holds objects other than tensors and plain containers, which student_state_dict "
                        f"does not unpickle ({reason}); load a file you trust yourself with torch.load and pass the "
                        f"dict") from None


def _recordable(value: Any) -> bool:
    """Whether a constructor argument can be saved as a hyperparameter and rebuild the module."""
    if value is None or isinstance(value, (str, Path)):
        return True
    if isinstance(value, Mapping):
        return all(isinstance(k, str) and isinstance(v, (int, float)) for k, v in value.items())
    return isinstance(value, Sequence) and all(isinstance(item, str) for item in value)


def _model(model: nn.Module | str | Path, kwargs: Mapping[str, Any] | None, role: str) -> nn.Module:
    """A module as given, a ``jacplug train`` checkpoint's model, or a registered model built by name."""
    if isinstance(model, nn.Module):
        if kwargs:
            raise UserError(f"{role}_kwargs= builds a {role} from a name; the {role} given is a module already")
        return model
    if isinstance(model, (str, Path)) and str(model).endswith(".safetensors"):
        from ..models.pretrained import load_model

        return load_model(model)
    if isinstance(model, str):
        from ..registry import create_model

        kwargs = dict(kwargs or {})
        try:  # a missing or unknown keyword (a timm name needs num_classes) is the caller's, not the model's
            return create_model(model, **kwargs)
        except TypeError as exc:
            raise UserError(f"{role}={model!r} with {role}_kwargs={kwargs}: {exc}; e.g. "
                            f"{role}_kwargs={{'num_classes': 10}}") from None
    raise UserError(f"{role}= takes a module, a model name or a jacplug checkpoint's path, got {type(model).__name__}")
