"""The distillation step, in one object that every loop calls: :class:`Distiller`.

A correct Jacobian-matching step follows a handful of rules, and each forgotten one is silent or slow:

- the inputs require grad *before* both forward passes, and only when a term needs input Jacobians;
- the teacher is frozen and in eval mode (train-mode BatchNorm would couple the samples' Jacobians and
  move its statistics), and runs with grad enabled only when a term takes its Jacobian rows, which
  are then computed without a graph;
- the student runs inside :func:`jacplug.double_differentiable` only when a term back-propagates
  through its input Jacobian (fused attention and hard-sigmoid have no double backward; elsewhere the
  fastest kernels stay);
- feature terms get both models' maps from :class:`jacplug.FeatureTap`, token outputs as maps;
- the loss terms run outside autocast on logits of at least float32 (:mod:`jacplug.outputs`);
- extra evaluations of the models (forward mode, finite differences, noisy copies) leave BatchNorm's
  running statistics alone and run in full precision (:func:`jacplug.losses.extra_evaluation`);
- before the first update, every term is shown to reach the parameters it trains, and an op without
  the derivative a term takes is named in one line (:mod:`jacplug.checks.first_call`).

``out = distiller(images, labels)`` applies them all and returns the shape of a timm training task's
result, ``{"loss": total, "output": student logits, <term>: unweighted value, ...}``, on the graph;
``out["loss"].backward()`` trains. ``distiller.step(optimizer, images, labels)`` is the whole
training step (forward, backward, update), captured in a CUDA graph with ``capture=True``.

Distributed: wrap the student in ``DistributedDataParallel`` before handing it over (the Distiller
then broadcasts the loss terms' adapters from rank 0 and :meth:`Distiller.sync_gradients` averages
their gradients, which :meth:`Distiller.step` does by itself), or wrap the whole Distiller (its
trainable parameters are the student's and the adapters'; the teacher is not among them). Either
way a loss that misses some parameter (a Jacobian-only loss never reaches the classifier's bias)
reaches every one with a zero gradient, as DDP's bucketed all-reduce requires.
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from .capture import CapturedStep
from .engine.substitutions import DOUBLE_BACKWARD, Substitution, double_differentiable
from .errors import UserError
from .features import FeatureTap
from .checks.gradient_flow import TermFlow, gradient_flow, raise_for_detached
from .losses.base import DistillBatch, as_scalar
from .losses.composite import WeightedLoss
from .losses.extra_evaluation import extra_evaluation, isolated_running_stats
from .outputs import at_least_float32, logits_of
from .checks.first_call import check_forward_mode, flow_of_terms

#: keys of the result that are not loss terms
RESERVED_KEYS = ("loss", "output")

LossSpec = WeightedLoss | Sequence[str] | Mapping[str, float] | str | None
Amp = bool | str | torch.dtype | None


class Distiller(nn.Module):
    """One distillation step of ``student`` towards the frozen ``teacher``.

    ``loss``: the CLI's spec strings (``["kd=0.5", "jacobian=0.15:classes=label"]``), a
    ``{name: weight}`` dict, a :class:`~jacplug.losses.WeightedLoss`, or ``None`` for the documented
    preset (:func:`jacplug.losses.jacobian_distillation`). ``amp``: ``"auto"`` (bf16 autocast for the
    forward passes on a CUDA device with bf16, none elsewhere), ``True`` (bf16), ``False``/``None``,
    or a dtype. ``check_gradients``: run the gradient-flow check on the first call. ``capture``:
    :meth:`step` and :meth:`compute_gradients` replay a CUDA graph after three eager calls (on CUDA,
    single process; eager elsewhere, see :class:`jacplug.CapturedStep`). ``substitutions``: the op
    substitutions the double-differentiable student forward applies (``None``: every registered one).
    ``name``: the student's name in error messages. ``teacher_input``: a differentiable map from the
    student's input to the teacher's (e.g. another normalisation), applied inside the step so the
    teacher's Jacobian is taken w.r.t. the student's input, chain rule included; an ``nn.Module``
    moves with the Distiller.

    The teacher is frozen (``requires_grad_(False)``) and kept in eval mode whatever ``train()`` is
    called with; it moves with ``.to()`` but is not a sub-module, so ``parameters()``,
    ``state_dict()`` and a ``DistributedDataParallel`` around the Distiller hold only what is trained:
    the student and the loss terms' adapters.
    """

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module,
        loss: LossSpec = None,
        *,
        amp: Amp = "auto",
        check_gradients: bool = True,
        capture: bool = False,
        substitutions: Iterable[Substitution] | None = None,
        name: str | None = None,
        teacher_input: Callable[[Tensor], Tensor] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
            raise UserError(f"Distiller(student, teacher) takes two nn.Modules, got {type(student).__name__} "
                            f"and {type(teacher).__name__}")
        self._ddp = (student,) if isinstance(student, DistributedDataParallel) else ()
        self.student = student.module if self._ddp else student
        self._wrapper: tuple[nn.Module, ...] = self._ddp
        self.loss = as_weighted_loss(loss)
        clashes = [key for key in self.loss.terms if key in RESERVED_KEYS]
        if clashes:
            raise UserError(f"loss term key(s) {clashes} clash with the result's {list(RESERVED_KEYS)}; rename them")
        self._teacher = (teacher.eval().requires_grad_(False),)  # a tuple: not a registered sub-module
        if teacher_input is not None and not callable(teacher_input):
            raise UserError(f"teacher_input must be a callable (a function or nn.Module mapping the student's input "
                            f"to the teacher's), got {type(teacher_input).__name__}")
        self.teacher_input = teacher_input
        self.amp = _check_amp(amp)
        self.check_gradients = check_gradients
        self.substitutions = None if substitutions is None else _check_substitutions(substitutions)
        self._validated = False  # the first call checks devices, dtypes, labels and values (_check_models, _check_values)
        self._checked_optimizer: int | None = None
        self.name = name or type(self.student).__name__
        self.checked = not check_gradients
        self.capture = capture
        self._layout: tuple[bool, tuple[str, ...]] = (True, ())
        self._captured: CapturedStep | None = None  # made on the first step, which shows the device
        if self._ddp:
            for tensor in self.loss.state_dict().values():  # what DDP does for the student's own state
                dist.broadcast(tensor, src=0)

    # --------------------------------------------------------------------------------------------
    # what is trained, and the teacher

    @property
    def teacher(self) -> nn.Module:
        return self._teacher[0]

    @property
    def student_wrapper(self) -> nn.Module:
        """The module the step calls for the student's forward: the ``DistributedDataParallel`` the
        Distiller was given, a wrapper a framework made around the student afterwards (set it here),
        or the student itself. Feature taps and extra evaluations always use the student itself."""
        return self._wrapper[0] if self._wrapper else self.student

    @student_wrapper.setter
    def student_wrapper(self, module: nn.Module) -> None:
        self._wrapper = () if module is self.student else (module,)  # a tuple: not a registered sub-module

    def __setattr__(self, name: str, value: object) -> None:
        if name == "student_wrapper":  # the property's setter: nn.Module would register a module as a sub-module
            object.__setattr__(self, name, value)
        else:
            super().__setattr__(name, value)

    def trainable_parameters(self) -> list[Tensor]:
        """The parameters an optimizer must train: the student's and the loss terms' (FitNet adapters)
        that require grad, each once; never the teacher's."""
        seen: set[int] = set()
        params = []
        for p in [*self.student.parameters(), *self.loss.parameters()]:
            if p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        return params

    def train(self, mode: bool = True) -> "Distiller":
        super().train(mode)
        self.teacher.eval()
        return self

    def _apply(self, fn, *args, **kwargs):  # .to(), .cuda(), .double() move the teacher too
        self.teacher._apply(fn, *args, **kwargs)
        return super()._apply(fn, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"teacher={type(self.teacher).__name__} (frozen, eval), amp={self.amp!r}"

    # --------------------------------------------------------------------------------------------
    # the step

    def forward(self, inputs: Tensor, targets: Tensor | None = None, *,
                cached: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """``{"loss": weighted total, "output": student logits [B, C], <term key>: unweighted value}``,
        all on the student's graph, for ``inputs`` ``[B, *S]`` and ``targets`` ``[B]`` (optional when
        no term reads labels). ``cached``: the teacher's precomputed entries for this batch
        (``teacher_logits`` ``[B, C]``, and rows, see :mod:`jacplug.training.teacher_cache`), which replace
        its forward and backward. On the first call, the checks of :mod:`jacplug.checks.first_call` run
        (unless ``check_gradients=False``): a term that cannot train the student raises here, before
        any update.
        """
        self._check_inputs(inputs, targets, cached)
        if not self._validated:
            self._check_models(inputs)
        if not self.checked:
            out = self._checked_forward(inputs, targets, cached)
            self.checked = self._validated = True
            return out
        values, logits = self._terms(inputs, targets, cached)
        self._validated = True
        return {"loss": self._total(values), "output": logits, **values}

    def compute_gradients(self, inputs: Tensor, targets: Tensor | None = None, *,
                          cached: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The step without the update: ``.grad`` of every trainable parameter holds the gradient of
        the weighted total (the tensors are zeroed and accumulated into, not replaced, so they stay the
        same tensors for a CUDA graph); adapters outside a DDP student are averaged over the ranks.
        Returns ``loss``, each term and ``output``, detached; with ``capture=True`` they are the
        graph's own buffers, overwritten by the next call."""
        if self._captured is None:
            self._captured = CapturedStep(self._forward_backward,
                                          enabled=self.capture and not self._ddp and inputs.is_cuda)
        self._layout = (targets is not None, tuple(cached or ()))
        tensors = (inputs, *([targets] if targets is not None else []), *(cached or {}).values())
        values = self._captured(*tensors)
        if self._ddp:
            self.sync_gradients()
        return dict(values)

    def step(self, optimizer: torch.optim.Optimizer, inputs: Tensor, targets: Tensor | None = None, *,
             cached: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """One whole training step: :meth:`compute_gradients`, then ``optimizer.step()``; returns the
        detached ``loss``, terms and ``output`` (read them before the next call)."""
        if self._checked_optimizer != id(optimizer):
            self._check_optimizer(optimizer)
            self._checked_optimizer = id(optimizer)
        values = self.compute_gradients(inputs, targets, cached=cached)
        optimizer.step()
        return values

    def _check_optimizer(self, optimizer: torch.optim.Optimizer) -> None:
        """An optimizer that holds none of the trainable parameters would make every step a silent no-op."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise UserError(f"step(optimizer, ...) takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not any(id(p) in held for p in self.trainable_parameters()):
            raise UserError("the optimizer holds none of the Distiller's trainable parameters, so step() would "
                            "train nothing; build it with torch.optim.AdamW(distiller.trainable_parameters(), ...)")

    def sync_gradients(self) -> None:
        """Average the loss terms' adapter gradients over the ranks of a multi-process run (a no-op in
        one process or for a loss without parameters). Needed when only the student is wrapped in
        ``DistributedDataParallel``, which averages its own module's gradients only: :meth:`step` and
        :meth:`compute_gradients` do it by themselves; a loop of your own calls it after ``backward()``.
        Averaging gradients that are already equal on every rank changes nothing, so a surplus call is
        harmless."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return
        params = [p for p in self.loss.parameters() if p.requires_grad]
        if not params:
            return
        world = dist.get_world_size()
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for p in params:
            mean = flat[offset: offset + p.numel()].view_as(p).to(p.dtype)
            if p.grad is None:
                p.grad = mean.clone()
            else:
                p.grad.copy_(mean)
            offset += p.numel()

    @property
    def capture_status(self) -> str:
        """How :meth:`step` runs: ``"CUDA graph"``, ``"eager"``, or ``"eager (capture failed: ...)"``."""
        captured = self._captured
        if captured is None or captured.fallback in (None, "disabled"):
            return "CUDA graph" if captured is not None and captured.captured else "eager"
        return f"eager (capture failed: {captured.fallback})"

    @property
    def captured_step(self) -> CapturedStep | None:
        """The :class:`jacplug.CapturedStep` behind :meth:`step` (its calls, replays and fallback);
        ``None`` before the first step."""
        return self._captured

    @property
    def steps_run(self) -> int:
        """Calls of :meth:`compute_gradients` (and :meth:`step`) so far."""
        return 0 if self._captured is None else self._captured.calls

    @property
    def capture_fallback(self) -> str | None:
        """Why a requested CUDA graph is not used (one line), or ``None``."""
        fallback = None if self._captured is None else self._captured.fallback
        return None if fallback == "disabled" else fallback

    def check(self, inputs: Tensor, targets: Tensor | None = None) -> list[TermFlow]:
        """Every term once on ``inputs``, and each term's gradient-flow report; nothing is trained and
        nothing changes (RNG state, running statistics and ``.grad`` are as before).

        Raises a one-line :class:`jacplug.UserError` when the student lacks a derivative some term
        needs (naming the op, the module and what works instead); a detached term is reported, not
        raised (:func:`jacplug.checks.gradient_flow.raise_for_detached` raises it).
        """
        self._check_inputs(inputs, targets)
        self._check_models(inputs)
        devices = [inputs.device] if inputs.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices), isolated_running_stats(self.student):
            _, report = flow_of_terms(lambda: self._terms(inputs, targets, None)[0], self.trainable_parameters(),
                                      self.loss, self.student, inputs, self.name)
            check_forward_mode(self.loss, self.student, inputs, self.name)
        return report

    # --------------------------------------------------------------------------------------------

    def _checked_forward(self, inputs: Tensor, targets: Tensor | None,
                         cached: Mapping[str, Tensor] | None) -> dict[str, Tensor]:
        logits: list[Tensor] = []

        def compute() -> dict[str, Tensor]:
            values, output = self._terms(inputs, targets, cached)
            logits.append(output)
            return values

        values, report = flow_of_terms(compute, self.trainable_parameters(), self.loss, self.student, inputs,
                                       self.name)
        raise_for_detached(report)
        gradient_flow(values, self.trainable_parameters())  # warns about zero or non-finite gradients
        check_forward_mode(self.loss, self.student, inputs, self.name)
        return {"loss": self._total(values), "output": logits[0], **values}

    def _terms(self, inputs: Tensor, targets: Tensor | None,
               cached: Mapping[str, Tensor] | None) -> tuple[dict[str, Tensor], Tensor]:
        """Each term's unweighted scalar value on the student's graph, and the student's logits."""
        loss, teacher = self.loss, self.teacher
        if teacher.training:  # the caller switched it back: BatchNorm would couple the samples' rows
            teacher.eval()
        needs, layers = loss.needs, loss.feature_layers
        input_grad = "input_grad" in needs
        x = inputs.detach().requires_grad_(input_grad)
        model = self.student_wrapper  # a DDP's forward registers the gradient all-reduce
        with contextlib.ExitStack() as stack:
            s_tap = stack.enter_context(FeatureTap(self.student, list(layers))) if layers else None
            t_tap = stack.enter_context(FeatureTap(teacher, list(layers.values()), requires_grad=False)) if layers else None
            with self._autocast(x.device), self._student_mode():
                student_logits = at_least_float32(logits_of(model(x), "student"))
            student_features = s_tap.maps() if s_tap else {}
            cache: dict[str, Tensor] = {}
            if cached is not None and not layers:
                teacher_logits = cached["teacher_logits"]
                cache = {k: v for k, v in cached.items() if k != "teacher_logits"}
            else:
                with torch.set_grad_enabled(input_grad), self._autocast(x.device):
                    teacher_logits = at_least_float32(logits_of(teacher(self._teacher_view(x)), "teacher"))
            teacher_features = t_tap.maps() if t_tap else {}
        self._check_outputs(student_logits, teacher_logits, cached is not None and not layers)
        if not self._validated:
            self._check_values(inputs, targets, student_logits.shape[1])
        batch = DistillBatch(
            inputs=x,
            student_logits=student_logits,
            teacher_logits=teacher_logits,
            targets=targets,
            student_fn=extra_evaluation(self.student) if "student_fn" in needs else None,
            teacher_fn=self._teacher_fn(),
            student_features=student_features,
            teacher_features=teacher_features,
            cache=cache,
            logits_match_fns=self.amp_dtype(x.device) is None,
        )
        with torch.autocast(x.device.type, enabled=False):  # also when the caller's loop runs under autocast
            values = {key: as_scalar(term(batch), term, loss.origin(key)) for key, term in loss.terms.items()}
        return values, student_logits

    def _teacher_view(self, x: Tensor) -> Tensor:
        return x if self.teacher_input is None else self.teacher_input(x)

    def _teacher_fn(self) -> Callable[[Tensor], Tensor]:
        evaluate = extra_evaluation(self.teacher)
        return evaluate if self.teacher_input is None else (lambda x: evaluate(self.teacher_input(x)))

    def _total(self, values: Mapping[str, Tensor]) -> Tensor:
        """``sum_i weight_i * term_i``; in a multi-process run plus ``0 * p[0]`` for every trainable
        parameter ``p``, the same value and gradients, but every parameter is reached.

        Why: DistributedDataParallel all-reduces gradients in buckets and waits for every parameter's
        gradient; a loss whose terms miss some parameters would leave a bucket unreduced. One element
        per parameter (not ``p.sum()``, whose gradient is an expanded, zero-stride tensor that does not
        fit DDP's bucket layout).
        """
        total = self.loss.weighted_sum(values)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            total = total + 0.0 * torch.stack([p.reshape(-1)[0] for p in self.trainable_parameters()]).sum()
        return total

    def _forward_backward(self, *tensors: Tensor) -> dict[str, Tensor]:
        has_targets, keys = self._layout
        inputs, rest = tensors[0], list(tensors[1:])
        targets = rest.pop(0) if has_targets else None
        cached = dict(zip(keys, rest)) if keys else None
        out = self(inputs, targets, cached=cached)
        for p in self.trainable_parameters():  # zeroed, not set to None: a CUDA graph keeps the tensors
            if p.grad is not None:
                p.grad.zero_()
        out["loss"].backward()
        return {key: value.detach() for key, value in out.items()}

    def _student_mode(self) -> contextlib.AbstractContextManager:
        """Double-differentiable only when a term back-propagates through the student's input Jacobian;
        forward-mode terms re-run the student themselves."""
        if DOUBLE_BACKWARD in self.loss.higher_order:
            return double_differentiable(self.substitutions)
        return contextlib.nullcontext()

    def amp_dtype(self, device: torch.device) -> torch.dtype | None:
        """The autocast dtype of the forward passes on ``device`` (``None``: full precision)."""
        if self.amp in (None, False):
            return None
        if self.amp == "auto":
            bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
            return torch.bfloat16 if bf16 else None
        return torch.bfloat16 if self.amp is True else self.amp

    def _autocast(self, device: torch.device) -> contextlib.AbstractContextManager:
        dtype = self.amp_dtype(device)
        if dtype is None:
            return contextlib.nullcontext()
        # autocast's cache of cast weights must not outlive a CUDA-graph capture (PyTorch's rule)
        capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        return torch.autocast(device.type, dtype=dtype, cache_enabled=not capturing)

    # --------------------------------------------------------------------------------------------
    # checks of what the caller hands over: shapes and types on every call (Python attributes, no host
    # synchronisation); values, devices and dtypes on the first call only, which runs eagerly before any
    # CUDA graph is captured, so the captured step holds no data-dependent decision

    def _check_inputs(self, inputs: Tensor, targets: Tensor | None,
                      cached: Mapping[str, Tensor] | None = None) -> None:
        if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.dim() < 2:
            got = f"{tuple(inputs.shape)} {inputs.dtype}" if isinstance(inputs, Tensor) else type(inputs).__name__
            raise UserError(f"the Distiller's inputs must be a floating-point batch [B, *S], got {got}")
        needing = self._reading_labels()
        if targets is None:
            if needing:
                raise UserError(f"loss terms {needing} read labels: call distiller(inputs, targets) with targets [B]")
        elif not isinstance(targets, Tensor) or targets.shape[:1] != inputs.shape[:1]:
            got = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
            raise UserError(f"targets must be a tensor [B] with B = {inputs.shape[0]} (the inputs' batch), got {got}")
        elif needing and (targets.dim() != 1 or targets.is_floating_point() or targets.is_complex()
                          or targets.dtype == torch.bool):
            raise UserError(f"loss terms {needing} read class labels: targets must be integer class indices [B] "
                            f"(torch.long), got {tuple(targets.shape)} {targets.dtype}")
        if cached is not None:
            if not isinstance(cached, Mapping) or "teacher_logits" not in cached:
                got = sorted(cached) if isinstance(cached, Mapping) else type(cached).__name__
                raise UserError(f"cached= must be a mapping with at least 'teacher_logits' [B, C] (see "
                                f"jacplug.training.teacher_cache), got {got}")
            wrong = {key: tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
                     for key, value in cached.items()
                     if not isinstance(value, Tensor) or value.shape[:1] != inputs.shape[:1]}
            if wrong:
                raise UserError(f"cached= entries must be tensors [B, ...] with B = {inputs.shape[0]} (the inputs' "
                                f"batch), got {wrong}")

    def _reading_labels(self) -> list[str]:
        return [key for key, term in self.loss.terms.items() if "targets" in term.needs]

    def _check_models(self, inputs: Tensor) -> None:
        """Both models on the inputs' device, and in their dtype unless autocast casts them."""
        autocast = self.amp_dtype(inputs.device) is not None
        for role, model in (("student", self.student), ("teacher", self.teacher)):
            weight = next((p for p in model.parameters() if p.is_floating_point()), None)
            if weight is None:
                continue
            if weight.device != inputs.device:
                raise UserError(f"the {role} is on {weight.device} but the inputs are on {inputs.device}; move both "
                                f"models and the batches to one device (distiller.to(device) moves both models)")
            if weight.dtype != inputs.dtype and not autocast:
                raise UserError(f"the {role}'s parameters are {weight.dtype} but the inputs are {inputs.dtype}; "
                                "use one dtype for both models and the inputs (e.g. .float() on all three)")

    def _check_outputs(self, student_logits: Tensor, teacher_logits: Tensor, from_cache: bool) -> None:
        """Logits ``[B, C]``, the same ``C`` for both models: a shape check, free on every call."""
        for role, logits in (("student", student_logits), ("teacher (cached)" if from_cache else "teacher",
                                                           teacher_logits)):
            if logits.dim() != 2 or not logits.is_floating_point():
                raise UserError(f"the {role} returned {tuple(logits.shape)} {logits.dtype} logits; a classifier's "
                                "forward must return floating-point logits [B, C]")
        if student_logits.shape != teacher_logits.shape:
            raise UserError(f"the student returns logits {tuple(student_logits.shape)} but the teacher "
                            f"{tuple(teacher_logits.shape)}; both must classify the same C classes (build both "
                            "with the same num_classes)")

    def _check_values(self, inputs: Tensor, targets: Tensor | None, num_classes: int) -> None:
        """Labels in ``[0, C)`` and finite inputs, read once on the first call (each read is a host sync)."""
        if targets is not None and targets.numel() and self._reading_labels():
            low, high = int(targets.min()), int(targets.max())
            if low < 0 or high >= num_classes:
                raise UserError(f"targets hold labels from {low} to {high}, but the models classify {num_classes} "
                                f"classes; labels must be 0 to {num_classes - 1}")
        if not bool(torch.isfinite(inputs).all()):
            raise UserError("the inputs hold NaN or infinite values; check the data and its normalisation (a "
                            "zero standard deviation divides by zero)")


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


def _check_substitutions(substitutions: Iterable[Substitution]) -> list[Substitution]:
    if isinstance(substitutions, (str, bytes)) or not isinstance(substitutions, Iterable):
        raise UserError(f"substitutions= takes Substitution objects, e.g. jacplug.engine.substitutions."
                        f"registered_substitutions(), got {type(substitutions).__name__} {substitutions!r}")
    items = list(substitutions)
    wrong = [type(item).__name__ for item in items if not isinstance(item, Substitution)]
    if wrong:
        raise UserError(f"substitutions= takes Substitution objects (jacplug.engine.substitutions), got {wrong}")
    return items


def _check_amp(amp: Amp) -> Amp:
    if amp in (None, False, True, "auto") or isinstance(amp, torch.dtype) and amp.is_floating_point:
        return amp
    raise UserError(f"amp={amp!r}: expected 'auto', True (bf16), False or a floating dtype such as torch.float16")
