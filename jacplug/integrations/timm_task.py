"""``JacobianDistillationTask``: timm's logit-distillation task with jacplug's Jacobian terms.

timm (1.0.23 and later) trains through tasks: its ``train.py`` builds one (``LogitDistillationTask``
for ``--kd-model-name``) and its loop only calls ``result = task(input, target)``,
``result["loss"].backward()``, plus ``get_trainable_module()``, ``get_eval_model()``,
``prepare_distributed()``, ``setup_ema()`` / ``update_ema()`` and the checkpoint-state methods. timm's
own distillation tasks run the teacher under ``torch.no_grad()``, so none can match a Jacobian.

This task takes ``LogitDistillationTask``'s arguments (so swapping the class name is the whole change
in ``train.py``) plus ``loss=``, jacplug's extra terms (default: the Eq. 10 ``jacobian`` term at 0.3
times the distillation weight). The total is ``task_loss_weight * criterion(student, target) +
distill_loss_weight * KD(T) + <the jacplug terms>``, the weights resolved exactly as timm resolves them.
The distillation terms are one :class:`jacplug.Distiller`, which is the trainable module: its
parameters are the student's and the loss terms' adapters, never the teacher's. timm's optimizer
factory reads ``no_weight_decay()`` and ``group_matcher()`` from the module it is given; the trainable
module hands on the student's, under its ``student.`` prefix (as timm's own feature-distillation module
does), so weight decay and ``--layer-decay`` treat the student exactly as with ``LogitDistillationTask``;
the adapters join the top layer (the full learning rate).

The teacher may be a timm name (pretrained weights, as timm's task), a module, a
``DistillationTeacher``, or the path of a checkpoint written by ``jacplug train`` (the model it records,
with its weights and normalisation); ``teacher_pretrained_path`` loads any other local file into a
named timm model, as timm does. Each term's mean since the last call of :meth:`format_term_means` is
what a log line shows (timm's ``train.py`` logs only the total).

Teacher and student may be normalised differently (timm's pretrained configurations): the teacher
sees the student's input renormalised with its own mean and std (the Distiller's ``teacher_input``),
so its Jacobian is taken w.r.t. the student's input, chain rule included.

``compile()`` compiles the eval model only: PyTorch's compiler does not support the double backward
that the Jacobian terms take, so the training step stays eager (one log line says so).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..distiller import Distiller, as_weighted_loss
from ..errors import UnknownNameError, UserError
from ..losses.composite import WeightedLoss
from ..losses.distill import KDLoss

try:
    import timm
    from timm.models import group_parameters
    from timm.optim import auto_group_layers
    from timm.task import DistillationTeacher, TrainingTask, resolve_classification_loss
    from timm.utils import unwrap_model
    from timm.utils.model_ema import ModelEmaV3
except ImportError as exc:  # pragma: no cover - exercised only with an old timm
    raise ImportError("jacplug.integrations.timm_task needs timm's task API (timm>=1.0.23): "
                      "pip install -U 'timm>=1.0.23'") from exc

_logger = logging.getLogger(__name__)

#: the Jacobian term's weight per unit of distillation weight when ``loss`` is not given: the ratio
#: lambda of jacplug's default preset (docs/results.md)
DEFAULT_JACOBIAN_RATIO = 0.3


class Renormalize(nn.Module):
    """``[B, C, H, W]`` normalised with the student's mean and std -> normalised with the teacher's:
    ``(x * std_S + mean_S - mean_T) / std_T``, an affine map the teacher's Jacobian rows go through."""

    def __init__(self, student_mean: Tensor, student_std: Tensor, teacher_mean: Tensor, teacher_std: Tensor) -> None:
        super().__init__()
        for name, value in (("student_mean", student_mean), ("student_std", student_std),
                            ("teacher_mean", teacher_mean), ("teacher_std", teacher_std)):
            self.register_buffer(name, value.reshape(1, -1, 1, 1), persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x * self.student_std + self.student_mean - self.teacher_mean) / self.teacher_std


class TimmDistiller(Distiller):
    """The task's trainable module: a :class:`jacplug.Distiller` that answers what timm's optimizer
    factory asks a model (``create_optimizer_v2(module, weight_decay=..., layer_decay=...)``) with the
    student's own answers, prefixed with ``student.``: its ``no_weight_decay()`` names, and its layer
    groups for layer-wise learning-rate decay. The loss terms' adapters (``loss.*``) get the top layer."""

    def no_weight_decay(self) -> set[str]:
        """The student's parameters (timm's ``fnmatch`` patterns) that take no weight decay."""
        names = getattr(self.student, "no_weight_decay", None)
        return {f"student.{name}" for name in names()} if callable(names) else set()

    def group_matcher(self, coarse: bool = False) -> Callable[[str], int]:
        """Parameter name -> layer index: the student's layer groups (its ``group_matcher()``, or timm's
        fallback grouping when it has none, as for the student itself), the adapters in the top one."""
        student = self.student
        if hasattr(student, "group_matcher"):
            layers = group_parameters(student, student.group_matcher(coarse=coarse), reverse=True)
        else:
            layers = auto_group_layers(student)
        top = max(layers.values(), default=0)

        def matcher(name: str) -> int:
            return layers.get(name[len("student."):], top) if name.startswith("student.") else top

        return matcher


class JacobianDistillationTask(TrainingTask):
    """Logit distillation plus jacplug's terms, as a timm training task.

    Arguments as timm's ``LogitDistillationTask`` (``student_model``, ``teacher_model`` as a timm name,
    a module or a ``DistillationTeacher``, ``criterion`` / ``criterion_kwargs``,
    ``teacher_pretrained_path``, ``teacher_pretrained_cfg_overlay``, ``loss_type`` (``"kl"``),
    ``distill_loss_weight``, ``task_loss_weight``, ``temperature``, ``device``, ``dtype``, ``verbose``),
    plus ``loss``: jacplug's terms besides KD, as spec strings, a ``{name: weight}`` dict or a
    ``WeightedLoss`` (default ``["jacobian=W"]`` with ``W = 0.3 * distill_loss_weight``), and
    ``check_gradients`` (the Distiller's first-call check). ``teacher_model`` may also be the path of a
    ``jacplug train`` checkpoint (``teacher.safetensors``).

    ``task(input, target)`` returns ``{"loss", "output", "task_loss", "kd", <each jacplug term>}``.
    """

    def __init__(
        self,
        student_model: nn.Module,
        teacher_model: Union[str, nn.Module, DistillationTeacher],
        criterion: Optional[nn.Module] = None,
        criterion_kwargs: Optional[Dict[str, Any]] = None,
        teacher_pretrained_path: Optional[str] = None,
        teacher_pretrained_cfg_overlay: Optional[Dict[str, Any]] = None,
        loss_type: str = "kl",
        distill_loss_weight: Optional[float] = None,
        task_loss_weight: Optional[float] = None,
        temperature: float = 1.0,
        loss: Union[WeightedLoss, Sequence[str], Mapping[str, float], None] = None,
        check_gradients: bool = True,
        device: Optional[torch.device] = None,
        dtype: Optional[torch.dtype] = None,
        verbose: bool = True,
    ) -> None:
        super().__init__(device=device, dtype=dtype, verbose=verbose)
        if loss_type != "kl":
            raise UserError(f"loss_type={loss_type!r}: JacobianDistillationTask distils logits with 'kl' (as timm's "
                            f"LogitDistillationTask); add other jacplug terms through loss=")
        self.task_loss_weight, self.distill_loss_weight = _weights(distill_loss_weight, task_loss_weight)
        for name, weight in (("task_loss_weight", self.task_loss_weight), ("distill_loss_weight", self.distill_loss_weight)):
            if not 0 <= weight < float("inf"):
                raise UserError(f"{name}={weight!r}: weights must be finite and >= 0 (a negative weight would "
                                "maximise its loss)")
        if self.distill_loss_weight == 0 and loss is None:
            raise UserError("distill_loss_weight=0 leaves nothing to distil (the default Jacobian weight is 0.3 x "
                            "distill_loss_weight); pass loss= with jacplug terms to distil without KD, or train with "
                            "timm's classification task")
        if (isinstance(teacher_model, str) and not timm.is_model(teacher_model) and ":" not in teacher_model
                and Path(teacher_model).suffix != ".safetensors"):
            raise UnknownNameError("timm model", teacher_model, timm.list_models(),
                                   hint="teacher_model= takes a timm model name, a jacplug checkpoint "
                                        "(.safetensors) or an nn.Module")
        self.temperature = temperature
        self.criterion = resolve_classification_loss(criterion, self.device, criterion_kwargs=criterion_kwargs)
        student = unwrap_model(student_model)
        if isinstance(teacher_model, (str, Path)) and Path(teacher_model).suffix == ".safetensors":
            teacher_model = _jacplug_checkpoint(teacher_model)
        if isinstance(teacher_model, str):  # a timm name: built with pretrained weights, sized like the student
            teacher = DistillationTeacher(teacher_model, num_classes=student.num_classes,
                                          in_chans=getattr(student, "in_chans", 3), pretrained_path=teacher_pretrained_path,
                                          pretrained_cfg_overlay=teacher_pretrained_cfg_overlay, device=self.device,
                                          dtype=self.dtype)
        elif isinstance(teacher_model, DistillationTeacher):
            teacher = teacher_model
        else:  # any module: the student need not be a timm model either
            teacher = DistillationTeacher(teacher_model, device=self.device, dtype=self.dtype)
        terms = as_weighted_loss(loss if loss is not None else
                                 [f"jacobian={DEFAULT_JACOBIAN_RATIO * (self.distill_loss_weight or 1.0):g}"])
        if "kd" in terms.terms:
            raise UserError("loss= holds a 'kd' term: the task's KD term is set by distill_loss_weight and "
                            "temperature (as in timm's LogitDistillationTask); leave 'kd' out of loss=")
        if self.distill_loss_weight > 0:
            terms = WeightedLoss({"kd": (KDLoss(temperature=temperature), self.distill_loss_weight),
                                  **{key: (term, terms.weights[key]) for key, term in terms.terms.items()}})
        self.trainable_module = TimmDistiller(student_model, teacher.model, terms.to(self.device), amp=False,
                                              check_gradients=check_gradients, name=type(student).__name__,
                                              teacher_input=self._renormalize(student, teacher))
        self._term_sums: Dict[str, Tensor] = {}
        self._term_count = 0
        if self.verbose:
            _logger.info(f"JacobianDistillationTask: task_weight={self.task_loss_weight}, loss={terms.extra_repr()}, "
                         f"temperature={temperature}")

    def _renormalize(self, student: nn.Module, teacher: DistillationTeacher) -> Optional[Renormalize]:
        """The map from the student's input normalisation to the teacher's (timm's pretrained
        configurations), or ``None`` when they agree."""
        config = getattr(student, "pretrained_cfg", None) or {}
        mean, std = (torch.tensor(config.get(key, default), device=self.device, dtype=self.dtype).view(1, -1, 1, 1)
                     for key, default in (("mean", (0.485, 0.456, 0.406)), ("std", (0.229, 0.224, 0.225))))
        if torch.equal(mean, teacher.mean_kd) and torch.equal(std, teacher.std_kd):
            return None
        return Renormalize(mean, std, teacher.mean_kd, teacher.std_kd)

    @property
    def distiller(self) -> Distiller:
        """The :class:`jacplug.Distiller` behind the task (the trainable module, unwrapped)."""
        return unwrap_model(self.trainable_module)

    def forward(self, input: Tensor, target: Tensor) -> Dict[str, Tensor]:
        distiller = self.distiller
        reads_labels = any("targets" in term.needs for term in distiller.loss.terms.values())
        if reads_labels and target.dim() != 1:
            raise UserError(f"a jacplug term reads class labels, but the targets are {tuple(target.shape)} (mixup or "
                            f"cutmix soft targets?); turn those off or use terms without labels")
        out = self.trainable_module(input, target if reads_labels else None)
        task_loss = self.criterion(out["output"], target)
        total = self.task_loss_weight * task_loss + out["loss"]
        result = {**out, "loss": total, "task_loss": task_loss}
        if self.training:
            for key in ("task_loss", *distiller.loss.terms):
                value = result[key].detach()
                self._term_sums[key] = self._term_sums[key] + value if key in self._term_sums else value
            self._term_count += 1
        return result

    def term_means(self) -> Dict[str, float]:
        """Each part of the loss (``task_loss``, ``kd``, each jacplug term; unweighted) averaged over
        the training calls since the last call, on this process; the running sums restart."""
        means = {key: float(total) / self._term_count for key, total in self._term_sums.items()}
        self._term_sums, self._term_count = {}, 0
        return means

    def format_term_means(self) -> str:
        """:meth:`term_means` as one log line: ``task_loss 2.31  kd 0.912  jacobian 0.0412``."""
        return "  ".join(f"{key} {value:#.3g}" for key, value in self.term_means().items())

    # ---- timm's task protocol -------------------------------------------------------------------

    def prepare_distributed(self, device_ids: Optional[list] = None, **ddp_kwargs: Any) -> "JacobianDistillationTask":
        """Wrap the Distiller (student and adapters; the teacher is not among its parameters) in DDP."""
        from torch.nn.parallel import DistributedDataParallel

        self.trainable_module = DistributedDataParallel(self.trainable_module, device_ids=device_ids, **ddp_kwargs)
        return self

    def get_clip_parameters(self, exclude_head: bool = False) -> list[Tensor]:
        """What gradient clipping covers: the student's parameters (without its last two, the head, for
        ``exclude_head``, as timm does for a model) and the adapters'."""
        distiller = self.distiller
        student = list(distiller.student.parameters())
        return [*(student[:-2] if exclude_head else student), *distiller.loss.parameters()]

    def compile(self, backend: str = "inductor", mode: Optional[str] = None, **compile_kwargs: Any) -> nn.Module:
        """Compile the eval model only: the training step's double backward cannot be compiled."""
        if self.verbose:
            _logger.info("JacobianDistillationTask: compiling the eval model only; torch.compile does not support "
                         "the double backward of the Jacobian terms, so training runs eagerly")
        self.eval_model = torch.compile(self.distiller.student, backend=backend, mode=mode, **compile_kwargs)
        return self.eval_model

    def get_eval_model(self, module: Optional[nn.Module] = None, ema: bool = False) -> Optional[nn.Module]:
        """The student (or its EMA copy), for validation and checkpoints; never the Distiller."""
        if module is not None:
            return module
        if ema:
            if hasattr(self, "eval_model_ema"):
                return self.eval_model_ema
            ema_module = self.get_trainable_module(ema=True)
            return None if ema_module is None else ema_module.module
        return self.eval_model if hasattr(self, "eval_model") else self.distiller.student

    def setup_ema(self, decay: float = 0.9999, use_warmup: bool = False, device: Optional[torch.device] = None,
                  **kwargs: Any) -> nn.Module:
        """An EMA copy of the student (not of the Distiller, which would copy the teacher too)."""
        self.trainable_module_ema = ModelEmaV3(self.distiller.student, decay=decay, use_warmup=use_warmup,
                                               device=device, **kwargs)
        return self.trainable_module_ema

    def update_ema(self, step: Optional[int] = None) -> None:
        if self.has_ema():
            self.trainable_module_ema.update(self.distiller.student, step=step)

    def get_task_state(self, module: Optional[nn.Module] = None, ema: bool = False) -> Dict[str, Any]:
        """The loss terms' learnable state (FitNet adapters), saved beside the student's weights."""
        state = self.distiller.loss.state_dict()
        return {"jacplug_loss": dict(state)} if state and not ema else {}

    def load_task_state(self, state: Optional[Dict[str, Any]], strict: bool = True, module: Optional[nn.Module] = None,
                        ema: bool = False) -> None:
        if state and "jacplug_loss" in state:
            self.distiller.loss.load_state_dict(state["jacplug_loss"], strict=strict)


def _jacplug_checkpoint(path: Union[str, Path]) -> nn.Module:
    """The model a ``jacplug train`` checkpoint records, with its weights and its ``pretrained_cfg``
    (whose mean and std the teacher's input is normalised with)."""
    from ..models.pretrained import load_model

    return load_model(path)


def _weights(distill: Optional[float], task: Optional[float]) -> tuple[float, float]:
    """``(task weight, distillation weight)`` resolved as timm's ``LogitDistillationTask`` does: both
    given or only the distillation weight: independent (task 1.0 by default); only the task weight:
    complementary (distillation ``1 - task``); neither: both 1.0."""
    if distill is not None:
        return (1.0 if task is None else task), distill
    if task is not None:
        return task, 1.0 - task
    return 1.0, 1.0
