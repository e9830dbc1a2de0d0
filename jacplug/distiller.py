"""The distillation step, in one object that every loop calls: :class:`Distiller`.

A correct Jacobian-matching step follows a handful of rules, and each forgotten one is silent or slow:

- the inputs require grad *before* both forward passes, and only when a term needs input Jacobians;
- the teacher is frozen, in eval mode and outside what is trained (:class:`jacplug.frozen_teacher.FrozenTeacher`),
  and runs with grad enabled only when a term takes its Jacobian rows, which are then computed
  without a graph;
- the student runs inside :func:`jacplug.double_differentiable` only when a term back-propagates
  through its input Jacobian (fused attention and hard-sigmoid have no double backward; elsewhere the
  fastest kernels stay);
- feature terms get both models' maps from :class:`jacplug.FeatureTap`, token outputs as maps;
- the forward passes run under the ``amp`` autocast (:mod:`jacplug.precision`), the loss terms outside
  it on logits of at least float32 (:mod:`jacplug.outputs`);
- extra evaluations of the models (forward mode, finite differences, noisy copies) leave BatchNorm's
  running statistics alone and run in full precision (:func:`jacplug.losses.extra_evaluation`);
- before the first update, every term is shown to reach the parameters it trains, and an op without
  the derivative a term takes is named in one line (:mod:`jacplug.checks.first_call`); bad arguments
  and batches are one line each (:mod:`jacplug.checks.step_inputs`).

``out = distiller(images, labels)`` applies them all and returns the shape of a timm training task's
result, ``{"loss": total, "output": student logits, <term>: unweighted value, ...}``, on the graph;
``out["loss"].backward()`` trains. ``distiller.step(optimizer, images, labels)`` is the whole
training step (forward, backward, update), captured in a CUDA graph with ``capture=True``
(:class:`jacplug.CapturedStep`, read as ``distiller.captured_step``).

Distributed: wrap the student in ``DistributedDataParallel`` before handing it over (the Distiller
then broadcasts the loss terms' adapters from rank 0 and :meth:`Distiller.sync_gradients` averages
their gradients, which :meth:`Distiller.step` does by itself), or wrap the whole Distiller (its
trainable parameters are the student's and the adapters'; the teacher is not among them). Either
way a loss that misses some parameter (a Jacobian-only loss never reaches the classifier's bias)
reaches every one with a zero gradient, as DDP's bucketed all-reduce requires (:mod:`jacplug.ddp`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .capture import CapturedStep
from .checks.first_call import checked_terms, probe_terms
from .checks.gradient_flow import TermFlow
from .checks.step_inputs import (
    check_amp, check_batch, check_devices, check_flag, check_logits, check_models, check_optimizer, check_result_keys,
    check_substitutions, check_values, first_layers_checked,
)
from .ddp import average_gradients, broadcast_state, reach_every_parameter
from .engine.substitutions import DOUBLE_BACKWARD, Substitution, double_differentiable
from .errors import UserError
from .features import FeatureTap
from .frozen_teacher import FrozenTeacher
from .losses.base import DistillBatch, as_scalar
from .losses.composite import WeightedLoss
from .losses.extra_evaluation import extra_evaluation
from .outputs import at_least_float32, logits_of
from .precision import Amp, autocast_dtype, forward_autocast

#: keys of the result that are not loss terms
RESERVED_KEYS = ("loss", "output")

LossSpec = WeightedLoss | Sequence[str] | Mapping[str, float] | str | None


class Distiller(nn.Module):
    """One distillation step of ``student`` towards the frozen ``teacher``.

    ``loss``: the CLI's spec strings (``["kd=0.5", "jacobian=0.15:classes=label"]``), a ``{name: weight}``
    dict, a :class:`~jacplug.losses.WeightedLoss`, or ``None`` for the documented preset
    (:func:`jacplug.losses.jacobian_distillation`). ``amp``: see :func:`jacplug.precision.autocast_dtype`.
    ``check_gradients``: run the gradient-flow check on the first call. ``capture``: :meth:`step` and
    :meth:`compute_gradients` replay a CUDA graph after three eager calls (on CUDA, single process; eager
    elsewhere). ``substitutions``: the op substitutions of the double-differentiable student forward
    (``None``: every registered one). ``name``: the student's name in error messages. ``teacher_input``: a
    differentiable map from the student's input to the teacher's (another normalisation), part of the
    frozen teacher. The teacher moves with ``.to()`` but is no sub-module: ``parameters()``,
    ``state_dict()`` and a DDP around the Distiller hold only the student and the loss terms' adapters.
    """

    def __init__(self, student: nn.Module, teacher: nn.Module, loss: LossSpec = None, *, amp: Amp = "auto",
                 check_gradients: bool = True, capture: bool = False,
                 substitutions: Iterable[Substitution] | None = None, name: str | None = None,
                 teacher_input: Callable[[Tensor], Tensor] | None = None) -> None:
        super().__init__()
        check_models(student, teacher)  # every check before the teacher is frozen
        self.amp = check_amp(amp)
        self.check_gradients = check_flag("check_gradients", check_gradients)
        self.capture = check_flag("capture", capture)
        self.substitutions = None if substitutions is None else check_substitutions(substitutions)
        terms = as_weighted_loss(loss)
        check_result_keys(terms.terms, RESERVED_KEYS)
        self._ddp = (student,) if isinstance(student, DistributedDataParallel) else ()
        self.student = student.module if self._ddp else student
        self.loss = terms
        self.student_wrapper = student
        self.frozen_teacher = FrozenTeacher(teacher, teacher_input)
        self.name = name or type(self.student).__name__
        self._first_call = True  # it checks devices, dtypes, channels, labels, values and the gradient flow
        self._checked_optimizer: int | None = None
        self._layout: tuple[bool, tuple[str, ...]] = (True, ())  # what compute_gradients' flat tensors are
        self.captured_step: CapturedStep | None = None  # made on the first step, which shows the device
        if self._ddp:
            broadcast_state(self.loss)  # what DDP does for the student's own state

    @property
    def teacher(self) -> nn.Module:
        return self.frozen_teacher.model

    @property
    def teacher_input(self) -> Callable[[Tensor], Tensor] | None:
        return self.frozen_teacher.view

    @property
    def student_wrapper(self) -> nn.Module:
        """The module the step calls for the student's forward: the ``DistributedDataParallel`` the
        Distiller was given, a wrapper a framework made around the student afterwards (set it here),
        or the student itself. Feature taps and extra evaluations always use the student itself."""
        return self._wrapper[0] if self._wrapper else self.student

    def __setattr__(self, name: str, value: object) -> None:
        if name == "student_wrapper":  # kept in a tuple: nn.Module would register a module as a sub-module
            name, value = "_wrapper", () if value is self.student else (value,)
        super().__setattr__(name, value)

    def trainable_parameters(self) -> list[Tensor]:
        """The parameters an optimizer must train: the student's and the loss terms' (FitNet adapters)
        that require grad, each once; never the teacher's."""
        return list({id(p): p for p in [*self.student.parameters(), *self.loss.parameters()]
                     if p.requires_grad}.values())

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.frozen_teacher.keep_eval()
        return self

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .double() move the teacher too
        self.frozen_teacher.apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"teacher={type(self.teacher).__name__} (frozen, eval), amp={self.amp!r}"

    def forward(self, inputs: Tensor, targets: Tensor | None = None, *,
                cached: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``{"loss": weighted total, "output": student logits [B, C], <term key>: unweighted value}``, on
        the student's graph, for ``inputs`` ``[B, *S]`` and ``targets`` ``[B]`` (optional when no term reads
        labels). ``cached``: the teacher's precomputed entries for this batch (``teacher_logits`` ``[B, C]``,
        rows: :mod:`jacplug.training.teacher_cache`), which replace its forward and backward. The first
        call runs the checks of :mod:`jacplug.checks.first_call` (unless ``check_gradients=False``): a term
        that cannot train the student raises here, before any update."""
        check_batch(inputs, targets, cached, self.loss)
        logits: list[Tensor] = []

        def compute() -> dict[str, Tensor]:
            values, output = self._terms(inputs, targets, cached, first=self._first_call)
            logits.append(output)
            return values

        if self._first_call and self.check_gradients:
            values = checked_terms(compute, self.trainable_parameters(), self.loss, self.student, inputs, self.name)
        else:
            values = compute()
        self._first_call = False
        total = reach_every_parameter(self.loss.weighted_sum(values), self.trainable_parameters)
        return {"loss": total, "output": logits[0], **values}

    def compute_gradients(self, inputs: Tensor, targets: Tensor | None = None, *,
                          cached: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The step without the update: ``.grad`` of every trainable parameter holds the gradient of the
        weighted total (zeroed and accumulated into, so a CUDA graph keeps the tensors); adapters outside a
        DDP student are averaged over the ranks. Returns ``loss``, each term and ``output``, detached; with
        ``capture=True`` they are the graph's own buffers, overwritten by the next call."""
        if self.captured_step is None:
            self.captured_step = CapturedStep(self._forward_backward,
                                              enabled=self.capture and not self._ddp and inputs.is_cuda)
        self._layout = (targets is not None, tuple(cached or ()))
        values = self.captured_step(inputs, *([targets] if targets is not None else []), *(cached or {}).values())
        if self._ddp:
            self.sync_gradients()
        return dict(values)

    def step(self, optimizer: torch.optim.Optimizer, inputs: Tensor, targets: Tensor | None = None, *,
             cached: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """One whole training step: :meth:`compute_gradients`, then ``optimizer.step()``; returns the
        detached ``loss``, terms and ``output`` (read them before the next call)."""
        if self._checked_optimizer != id(optimizer):
            check_optimizer(optimizer, self.trainable_parameters())
            self._checked_optimizer = id(optimizer)
        values = self.compute_gradients(inputs, targets, cached=cached)
        optimizer.step()
        return values

    def sync_gradients(self) -> None:
        """Average the loss terms' adapter gradients over the ranks (a no-op in one process): a DDP around
        the student averages its own only. :meth:`step` calls it; a loop of your own, after ``backward()``."""
        average_gradients([p for p in self.loss.parameters() if p.requires_grad])

    @property
    def capture_status(self) -> str:
        """:attr:`jacplug.CapturedStep.status` of :attr:`captured_step` (``"eager"`` before the first step)."""
        return "eager" if self.captured_step is None else self.captured_step.status

    @property
    def capture_fallback(self) -> str | None:
        """:attr:`jacplug.CapturedStep.failure`: why a requested CUDA graph is not used, or ``None``."""
        return None if self.captured_step is None else self.captured_step.failure

    @property
    def steps_run(self) -> int:
        """Calls of :meth:`compute_gradients` (and :meth:`step`) so far."""
        return 0 if self.captured_step is None else self.captured_step.calls

    def check(self, inputs: Tensor, targets: Tensor | None = None) -> list[TermFlow]:
        """Every term once on ``inputs`` and each term's gradient-flow report; nothing is trained and nothing
        changes (RNG state, running statistics, ``.grad``). Raises as the first call would, except for a
        detached term, which is reported (:func:`jacplug.checks.gradient_flow.raise_for_detached`)."""
        check_batch(inputs, targets, None, self.loss)
        return probe_terms(lambda: self._terms(inputs, targets, None, first=True)[0], self.trainable_parameters(),
                           self.loss, self.student, inputs, self.name)

    def amp_dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype of the forward passes on ``device`` (``None``: full precision)."""
        return autocast_dtype(self.amp, device)

    def _terms(self, inputs: Tensor, targets: Tensor | None, cached: Mapping[str, Tensor] | None, *,
               first: bool) -> tuple[dict[str, Tensor], Tensor]:
        """Each term's unweighted scalar value on the student's graph, and the student's logits; ``first``:
        with the first call's checks of devices, channels and values."""
        loss, teacher, dtype = self.loss, self.frozen_teacher, self.amp_dtype(inputs.device)
        models = {"student": self.student, "teacher": teacher.model}
        if first:
            check_devices(models, inputs, autocast=dtype is not None)
        teacher.keep_eval()  # the caller may have switched it back: BatchNorm would couple the samples' rows
        needs, layers = loss.needs, loss.feature_layers
        x = inputs.detach().requires_grad_("input_grad" in needs)
        from_cache = cached is not None and not layers
        with contextlib.ExitStack() as stack:
            if first:
                stack.enter_context(first_layers_checked(models))
            s_tap = stack.enter_context(FeatureTap(self.student, list(layers))) if layers else None
            t_tap = stack.enter_context(FeatureTap(teacher.model, list(layers.values()), requires_grad=False)) if layers else None
            with forward_autocast(dtype, x.device), self._student_mode():  # a DDP's forward registers the all-reduce
                student_logits = at_least_float32(logits_of(self.student_wrapper(x), "student"))
            student_features = s_tap.maps() if s_tap else {}
            teacher_logits = cached["teacher_logits"] if from_cache else teacher.logits(x, dtype)
            teacher_features = t_tap.maps() if t_tap else {}
        check_logits(student_logits, teacher_logits, from_cache)
        if first:
            check_values(inputs, targets, student_logits.shape[1], loss)
        evaluate_teacher = extra_evaluation(teacher.model)
        batch = DistillBatch(
            inputs=x, student_logits=student_logits, teacher_logits=teacher_logits, targets=targets,
            student_fn=extra_evaluation(self.student) if "student_fn" in needs else None,
            teacher_fn=lambda t: evaluate_teacher(teacher.input(t)),
            student_features=student_features, teacher_features=teacher_features,
            cache={k: v for k, v in cached.items() if k != "teacher_logits"} if from_cache else {},
            logits_match_fns=dtype is None)
        with torch.autocast(x.device.type, enabled=False):  # also when the caller's loop runs under autocast
            values = {key: as_scalar(term(batch), term, loss.origin(key)) for key, term in loss.terms.items()}
        return values, student_logits

    def _student_mode(self) -> contextlib.AbstractContextManager:
        """Double-differentiable only when a term back-propagates through the student's input Jacobian."""
        twice = DOUBLE_BACKWARD in self.loss.higher_order
        return double_differentiable(self.substitutions) if twice else contextlib.nullcontext()

    def _forward_backward(self, *tensors: Tensor) -> dict[str, Tensor]:
        """:meth:`compute_gradients`' step on flat tensors (a CUDA graph's inputs), laid out by ``_layout``."""
        has_targets, keys = self._layout
        cached = dict(zip(keys, tensors[1 + int(has_targets):])) if keys else None
        out = self(tensors[0], tensors[1] if has_targets else None, cached=cached)
        for p in self.trainable_parameters():  # zeroed, not set to None: a CUDA graph keeps the tensors
            if p.grad is not None:
                p.grad.zero_()
        out["loss"].backward()
        return {key: value.detach() for key, value in out.items()}


def as_weighted_loss(loss: LossSpec) -> WeightedLoss:
    """A :class:`WeightedLoss` from any form the Distiller takes (see :class:`Distiller`)."""
    from .losses.presets import DEFAULT_SPECS, build_loss

    if isinstance(loss, WeightedLoss):
        return loss
    if loss is None:
        return build_loss(DEFAULT_SPECS)
    if isinstance(loss, str):
        return build_loss([loss])
    if isinstance(loss, Mapping):
        return build_loss([f"{name}={weight}" for name, weight in loss.items()])
    if isinstance(loss, Sequence) and all(isinstance(spec, str) for spec in loss):
        return build_loss(list(loss))
    raise UserError(f"loss= takes spec strings such as ['kd=0.5', 'jacobian=0.15'], a {{name: weight}} dict or a "
                    f"WeightedLoss, got {type(loss).__name__}")
