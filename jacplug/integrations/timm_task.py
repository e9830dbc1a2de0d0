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
One rule says which terms run (:data:`TERMS_RULE`): KD's weight is ``distill_loss_weight`` (0 leaves
it out), ``loss=`` lists the other terms, each with a weight > 0 (an empty list: none), so the KD
baseline is ``loss=[]`` and the criterion alone is ``loss=[]`` with ``distill_loss_weight=0``.
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

#: which terms the task runs, said by every refusal of a term's weight
TERMS_RULE = ("KD's weight is distill_loss_weight (0 leaves KD out) and loss= lists jacplug's other terms, each with "
              "a weight > 0: leave a term out to drop it; loss=[] (train.py: --jacplug-loss with no term) runs KD "
              "alone, and with distill_loss_weight=0 the criterion alone")


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


class _StudentGroups:
    """What timm's optimizer factory asks a model (``create_optimizer_v2(module, weight_decay=...,
    layer_decay=...)``), answered for a module holding ``self.student`` with the student's own answers,
    prefixed with ``student.``: its ``no_weight_decay()`` names, and its layer groups for layer-wise
    learning-rate decay. Any other parameter (the loss terms' adapters, ``loss.*``) gets the top layer."""

    student: nn.Module

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


class TimmDistiller(_StudentGroups, Distiller):
    """The task's trainable module: a :class:`jacplug.Distiller` whose parameter groups for timm's
    optimizer are the student's (see :class:`_StudentGroups`)."""


class NoTerms(nn.Module):
    """The empty loss of :class:`CriterionOnly`, read like a ``WeightedLoss``: no terms, no adapters."""

    def __init__(self) -> None:
        super().__init__()
        self.terms = nn.ModuleDict()
        self.weights: Dict[str, float] = {}


class CriterionOnly(_StudentGroups, nn.Module):
    """The trainable module when no distillation term is left (the criterion-alone baseline): the
    student alone, grouped for timm's optimizer as with distillation; the teacher never runs."""

    def __init__(self, student: nn.Module) -> None:
        super().__init__()
        self.student = student
        self.loss = NoTerms()

    def forward(self, input: Tensor, target: Optional[Tensor] = None) -> Dict[str, Tensor]:
        output = self.student(input)
        return {"loss": output.new_zeros(()), "output": output}


class JacobianDistillationTask(TrainingTask):
    """Logit distillation plus jacplug's terms, as a timm training task.

    Arguments as timm's ``LogitDistillationTask`` (``student_model``, ``teacher_model`` as a timm name,
    a module or a ``DistillationTeacher``, ``criterion`` / ``criterion_kwargs``,
    ``teacher_pretrained_path``, ``teacher_pretrained_cfg_overlay``, ``loss_type`` (``"kl"``),
    ``distill_loss_weight``, ``task_loss_weight``, ``temperature``, ``device``, ``dtype``, ``verbose``),
    plus ``loss``: jacplug's terms besides KD, as spec strings, a ``{name: weight}`` dict or a
    ``WeightedLoss`` (default ``["jacobian=W"]`` with ``W = 0.3 * distill_loss_weight``; ``[]`` for none:
    see :data:`TERMS_RULE`), and ``check_gradients`` (the Distiller's first-call check).
    ``teacher_model`` may also be the path of a ``jacplug train`` checkpoint (``teacher.safetensors``).

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
        if not isinstance(student_model, nn.Module):
            raise UserError(f"student_model= takes the student as an nn.Module (train.py's model), got "
                            f"{type(student_model).__name__} {student_model!r}")
        if not isinstance(teacher_model, (str, Path, nn.Module, DistillationTeacher)):
            raise UserError(f"teacher_model= takes a timm model name, a jacplug checkpoint's path, an nn.Module or a "
                            f"DistillationTeacher, got {type(teacher_model).__name__} {teacher_model!r}")
        teacher_model = str(teacher_model) if isinstance(teacher_model, Path) else teacher_model
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise UserError(f"dtype={dtype!r}: pass a floating torch.dtype, e.g. torch.float32 or torch.bfloat16")
        super().__init__(device=_device(device), dtype=dtype, verbose=verbose)
        if loss_type != "kl":
            raise UserError(f"loss_type={loss_type!r}: JacobianDistillationTask distils logits with 'kl' (as timm's "
                            f"LogitDistillationTask); add other jacplug terms through loss=")
        self.task_loss_weight, self.distill_loss_weight = _weights(distill_loss_weight, task_loss_weight)
        for name, weight in (("task_loss_weight", self.task_loss_weight), ("distill_loss_weight", self.distill_loss_weight)):
            if not 0 <= weight < float("inf"):
                raise UserError(f"{name}={weight!r}: weights must be finite and >= 0 (a negative weight would "
                                "maximise its loss)")
        if criterion is not None and not callable(criterion):
            raise UserError(f"criterion={criterion!r}: pass the loss module itself, e.g. torch.nn.CrossEntropyLoss(), "
                            f"or leave it out and set criterion_kwargs= (timm's create_classification_loss)")
        if teacher_pretrained_path is not None and not Path(teacher_pretrained_path).is_file():
            raise UserError(f"teacher_pretrained_path={str(teacher_pretrained_path)!r}: no such file; pass the "
                            f"teacher's local weights (train.py: --kd-model-path)")
        if (isinstance(teacher_model, str) and not timm.is_model(teacher_model) and ":" not in teacher_model
                and Path(teacher_model).suffix != ".safetensors"):
            raise UnknownNameError("timm model", teacher_model, timm.list_models(),
                                   hint="teacher_model= takes a timm model name, a jacplug checkpoint "
                                        "(.safetensors) or an nn.Module")
        self.temperature = temperature
        self.criterion = resolve_classification_loss(criterion, self.device, criterion_kwargs=criterion_kwargs)
        student = unwrap_model(student_model)
        if isinstance(teacher_model, str) and Path(teacher_model).suffix == ".safetensors":
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
        if loss is None:  # the default: the Jacobian term in proportion to KD
            if self.distill_loss_weight == 0:
                raise UserError(f"distill_loss_weight=0 leaves nothing to distil, and loss= is not given: {TERMS_RULE}")
            loss = [f"jacobian={DEFAULT_JACOBIAN_RATIO * self.distill_loss_weight:g}"]
        extra = _extra_terms(loss)
        terms = {"kd": (KDLoss(temperature=temperature), self.distill_loss_weight)} if self.distill_loss_weight else {}
        if extra is not None:
            terms.update({key: (term, extra.weights[key]) for key, term in extra.terms.items()})
        if terms:
            weighted = WeightedLoss(terms).to(self.device)
            self.trainable_module = TimmDistiller(student_model, teacher.model, weighted, amp=False,
                                                  check_gradients=check_gradients, name=type(student).__name__,
                                                  teacher_input=self._renormalize(student, teacher))
        else:
            self.trainable_module = CriterionOnly(student_model)
        self._in_chans = _in_chans(student)
        self._term_sums: Dict[str, Tensor] = {}
        self._term_count = 0
        if self.verbose:
            described = weighted.extra_repr() if terms else "none (the criterion alone; the teacher does not run)"
            _logger.info(f"JacobianDistillationTask: task_weight={self.task_loss_weight}, distillation terms: "
                         f"{described}, temperature={temperature}")

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
    def distiller(self) -> Union[Distiller, CriterionOnly]:
        """The :class:`jacplug.Distiller` behind the task (the trainable module, unwrapped), or the
        student alone when no distillation term is left (:class:`CriterionOnly`)."""
        return unwrap_model(self.trainable_module)

    def forward(self, input: Tensor, target: Tensor) -> Dict[str, Tensor]:
        distiller = self.distiller
        self._check_batch(input, target, distiller.student)
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

    def _check_batch(self, input: Tensor, target: Tensor, student: nn.Module) -> None:
        """What would fail deep in a forward pass (or, for labels on a GPU, as a device-side assert),
        refused in one line: integer images, a channel count the student does not take, labels outside
        its classes."""
        if not torch.is_tensor(input) or not input.is_floating_point():
            kind = input.dtype if torch.is_tensor(input) else type(input).__name__
            raise UserError(f"the task's input is {kind}: it takes float images normalised with the student's mean "
                            f"and std (timm's loader does both), not raw pixels")
        if self._in_chans is not None and (input.dim() < 2 or input.shape[1] != self._in_chans):
            raise UserError(f"the task's input is {tuple(input.shape)}, but the student takes {self._in_chans} channels "
                            f"([batch, {self._in_chans}, height, width]); match train.py's --in-chans to the data")
        classes = getattr(student, "num_classes", None)
        if isinstance(classes, int) and classes > 0 and target.dim() == 1 and not target.is_floating_point():
            outside = (target < 0) | (target >= classes)
            if bool(outside.any()):
                raise UserError(f"labels {sorted(set(target[outside].tolist()))[:8]} are outside the student's "
                                f"{classes} classes (0 to {classes - 1}); match --num-classes to the data")

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


def _extra_terms(loss: Union[WeightedLoss, Sequence[str], Mapping[str, float], str]) -> Optional[WeightedLoss]:
    """``loss=`` as the terms besides KD (``None`` for none); a ``kd`` term or a weight of 0 is refused
    with :data:`TERMS_RULE`, the one rule for which terms run."""
    if isinstance(loss, WeightedLoss):
        weights: Mapping[str, Any] = loss.weights
    elif isinstance(loss, Mapping):
        weights = loss
    elif isinstance(loss, str) or isinstance(loss, Sequence) and all(isinstance(spec, str) for spec in loss):
        specs = [loss] if isinstance(loss, str) else loss
        weights = {spec.partition("=")[0].strip(): spec.partition("=")[2].partition(":")[0] for spec in specs}
    else:
        return as_weighted_loss(loss)  # refuses the type in one line
    for name, weight in weights.items():
        if name == "kd":
            raise UserError(f"loss={loss!r} holds 'kd': {TERMS_RULE}")
        try:
            zero = float(weight) == 0
        except (TypeError, ValueError):
            zero = False  # a malformed spec: as_weighted_loss names what is wrong
        if zero:
            raise UserError(f"loss={loss!r} gives {name!r} the weight 0: {TERMS_RULE}")
    return as_weighted_loss(loss) if weights else None


def _jacplug_checkpoint(path: Union[str, Path]) -> nn.Module:
    """The model a ``jacplug train`` checkpoint records, with its weights and its ``pretrained_cfg``
    (whose mean and std the teacher's input is normalised with)."""
    from ..models.pretrained import load_model

    return load_model(path)


def _device(device: Union[torch.device, str, int, None]) -> Optional[torch.device]:
    """``device=`` as a ``torch.device`` this machine has; a name PyTorch does not know, or a device
    absent here (``cuda:7`` on one GPU, ``cuda`` without one), is refused in one line."""
    if device is None:
        return None
    try:
        resolved = torch.device(device)
        torch.empty(0, device=resolved)
    except (RuntimeError, AssertionError, TypeError) as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"device={device!r} is not a device of this machine ({reason}); e.g. 'cpu' or 'cuda:0'") from None
    return resolved


def _in_chans(student: nn.Module) -> Optional[int]:
    """The channels the student takes: a timm model's ``in_chans``, else its first convolution's
    (``None`` when it has neither: the input is not checked)."""
    chans = getattr(student, "in_chans", None)
    if isinstance(chans, int):
        return chans
    first = next((m for m in student.modules() if isinstance(m, nn.Conv2d)), None)
    return None if first is None else first.in_channels


def _weights(distill: Optional[float], task: Optional[float]) -> tuple[float, float]:
    """``(task weight, distillation weight)`` resolved as timm's ``LogitDistillationTask`` does: both
    given or only the distillation weight: independent (task 1.0 by default); only the task weight:
    complementary (distillation ``1 - task``); neither: both 1.0."""
    if distill is not None:
        return (1.0 if task is None else task), distill
    if task is not None:
        return task, 1.0 - task
    return 1.0, 1.0
