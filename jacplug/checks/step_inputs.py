"""What a caller hands :class:`jacplug.Distiller`, checked where a mistake would otherwise surface late,
deep inside PyTorch, or never: one :class:`jacplug.UserError` line each, naming what was wrong and what
would be right.

- at construction (:func:`check_models`, :func:`check_flag`, :func:`check_amp`,
  :func:`check_substitutions`), before the student or the teacher is touched;
- on every call (:func:`check_batch`, :func:`check_logits`): shapes and types only, Python attributes
  that cost no host synchronisation;
- on the first call (:func:`check_devices`, :func:`first_layers_checked`, :func:`check_values`), which runs
  eagerly before any CUDA graph is captured, so the captured step holds no data-dependent decision;
- on the first :meth:`jacplug.Distiller.step` with an optimizer (:func:`check_optimizer`).
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd
from torch.nn.parallel import DistributedDataParallel

from ..engine.substitutions import Substitution
from ..errors import UserError
from ..losses.composite import WeightedLoss

# --------------------------------------------------------------------------------------------------
# construction


def check_models(student: object, teacher: object) -> None:
    """Two modules, and a teacher that shares no trainable parameter with the student: the Distiller
    freezes the teacher, which would silently freeze the student too (or the part it shares)."""
    if not isinstance(student, nn.Module) or not isinstance(teacher, nn.Module):
        raise UserError(f"Distiller(student, teacher) takes two nn.Modules, got {type(student).__name__} "
                        f"and {type(teacher).__name__}")
    inner = student.module if isinstance(student, DistributedDataParallel) else student
    if teacher is inner or teacher is student:
        raise UserError("Distiller(student, teacher) got the same module as student and teacher; freezing the "
                        "teacher would freeze the student: pass a separate teacher (for self-distillation a copy, "
                        "copy.deepcopy(student))")
    held = {id(p) for p in teacher.parameters()}
    shared = [name for name, p in inner.named_parameters() if p.requires_grad and id(p) in held]
    if shared:
        raise UserError(f"Distiller(student, teacher): the teacher holds {len(shared)} of the student's trainable "
                        f"parameters ({', '.join(shared[:3])}{', ...' if len(shared) > 3 else ''}); freezing the "
                        "teacher would freeze them: pass a teacher that shares none (e.g. copy.deepcopy)")


def check_flag(name: str, value: object) -> bool:
    """``value`` itself when it is a bool: a string such as ``"no"`` would read as true."""
    if not isinstance(value, bool):
        raise UserError(f"{name}= takes True or False, got {type(value).__name__} {value!r}")
    return value


def check_amp(amp: object) -> object:
    if amp in (None, False, True, "auto") or isinstance(amp, torch.dtype) and amp.is_floating_point:
        return amp
    raise UserError(f"amp={amp!r}: expected 'auto', True (bf16), False or a floating dtype such as torch.float16")


def check_substitutions(substitutions: object) -> list[Substitution]:
    if isinstance(substitutions, (str, bytes)) or not isinstance(substitutions, Iterable):
        raise UserError(f"substitutions= takes Substitution objects, e.g. jacplug.engine.substitutions."
                        f"registered_substitutions(), got {type(substitutions).__name__} {substitutions!r}")
    items = list(substitutions)
    wrong = [type(item).__name__ for item in items if not isinstance(item, Substitution)]
    if wrong:
        raise UserError(f"substitutions= takes Substitution objects (jacplug.engine.substitutions), got {wrong}")
    return items


def check_result_keys(keys: Iterable[str], reserved: Sequence[str]) -> None:
    clashes = [key for key in keys if key in reserved]
    if clashes:
        raise UserError(f"loss term key(s) {clashes} clash with the result's {list(reserved)}; rename them")


# --------------------------------------------------------------------------------------------------
# every call


def labels_read_by(loss: WeightedLoss) -> list[str]:
    """The keys of the terms that read the labels."""
    return [key for key, term in loss.terms.items() if "targets" in term.needs]


def check_batch(inputs: object, targets: object, cached: object, loss: WeightedLoss) -> None:
    """``inputs`` a non-empty floating-point batch ``[B, *S]``; ``targets`` ``[B]``, class indices when
    a term of ``loss`` reads them; ``cached`` entries ``[B, ...]``."""
    reading_labels = labels_read_by(loss)
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point() or inputs.dim() < 2:
        got = f"{tuple(inputs.shape)} {inputs.dtype}" if isinstance(inputs, Tensor) else type(inputs).__name__
        raise UserError(f"the Distiller's inputs must be a floating-point batch [B, *S], got {got}")
    if inputs.shape[0] == 0:
        raise UserError(f"the Distiller's inputs are an empty batch {tuple(inputs.shape)}; pass at least one "
                        "sample")
    if targets is None:
        if reading_labels:
            raise UserError(f"loss terms {list(reading_labels)} read labels: call distiller(inputs, targets) with "
                            "targets [B]")
    elif not isinstance(targets, Tensor) or targets.shape[:1] != inputs.shape[:1]:
        got = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise UserError(f"targets must be a tensor [B] with B = {inputs.shape[0]} (the inputs' batch), got {got}")
    elif reading_labels and (targets.dim() != 1 or targets.is_floating_point() or targets.is_complex()
                             or targets.dtype == torch.bool):
        raise UserError(f"loss terms {list(reading_labels)} read class labels: targets must be integer class "
                        f"indices [B] (torch.long), got {tuple(targets.shape)} {targets.dtype}")
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


def check_logits(student_logits: Tensor, teacher_logits: Tensor, from_cache: bool) -> None:
    """Logits ``[B, C]``, the same ``C`` for both models."""
    for role, logits in (("student", student_logits),
                         ("teacher (cached)" if from_cache else "teacher", teacher_logits)):
        if logits.dim() != 2 or not logits.is_floating_point():
            raise UserError(f"the {role} returned {tuple(logits.shape)} {logits.dtype} logits; a classifier's "
                            "forward must return floating-point logits [B, C]")
    if student_logits.shape != teacher_logits.shape:
        raise UserError(f"the student returns logits {tuple(student_logits.shape)} but the teacher "
                        f"{tuple(teacher_logits.shape)}; both must classify the same C classes (build both "
                        "with the same num_classes)")


# --------------------------------------------------------------------------------------------------
# the first call


def check_devices(models: Mapping[str, nn.Module], inputs: Tensor, autocast: bool) -> None:
    """Each model (by role) on the inputs' device, and in their dtype unless autocast casts them."""
    for role, model in models.items():
        weight = next((p for p in model.parameters() if p.is_floating_point()), None)
        if weight is None:
            continue
        if weight.device != inputs.device:
            raise UserError(f"the {role} is on {weight.device} but the inputs are on {inputs.device}; move both "
                            f"models and the batches to one device (distiller.to(device) moves both models)")
        if weight.dtype != inputs.dtype and not autocast:
            raise UserError(f"the {role}'s parameters are {weight.dtype} but the inputs are {inputs.dtype}; "
                            "use one dtype for both models and the inputs (e.g. .float() on all three)")


@contextlib.contextmanager
def first_layers_checked(models: Mapping[str, nn.Module]) -> Iterator[None]:
    """Inside, the first convolution or linear layer each model (by role) runs checks the channels (features)
    of what it gets, and refuses a mismatch in one line naming the layer and the shapes.

    Why: images of the wrong channel count (grayscale for an RGB stem) or features of the wrong width fail
    inside PyTorch's kernel with a message that names neither the model nor the layer. Only a mismatch
    PyTorch would refuse anyway is refused here: the layer's own ``in_channels`` / ``in_features`` against
    the dimension PyTorch reads them from."""
    handles = []
    for role, model in models.items():
        hook = _first_layer_check(role, model)
        handles += [module.register_forward_pre_hook(hook) for module in model.modules()
                    if isinstance(module, (nn.Linear, _ConvNd)) and not getattr(module, "transposed", False)]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


def _first_layer_check(role: str, model: nn.Module) -> Callable[[nn.Module, tuple], None]:
    """The pre-hook of :func:`first_layers_checked` for one model: it checks the first layer that runs only."""
    names = {module: name for name, module in model.named_modules()}
    done: list[bool] = []

    def check(module: nn.Module, args: tuple) -> None:
        if done or not args or not isinstance(args[0], Tensor):
            return
        done.append(True)
        x = args[0]
        hint = ""
        if isinstance(module, nn.Linear):
            expected, got, unit = module.in_features, x.shape[-1] if x.dim() else None, "input features"
        else:  # PyTorch reads the channels from dim 1 of a batch, dim 0 of a single sample
            spatial = len(module.kernel_size)
            channel = {spatial + 2: 1, spatial + 1: 0}.get(x.dim())
            expected, got, unit = module.in_channels, None if channel is None else x.shape[channel], "input channels"
            hint = f" (timm: in_chans={got})"
        if got is not None and expected and got != expected:
            raise UserError(f"the {role}'s first layer {names.get(module, '?')!r} ({type(module).__name__}) takes "
                            f"{expected} {unit}, but what it gets, {tuple(x.shape)}, has {got}; build the {role} "
                            f"for {got} {unit}{hint} or give it {expected}")

    return check


def check_values(inputs: Tensor, targets: Tensor | None, num_classes: int, loss: WeightedLoss) -> None:
    """Labels in ``[0, C)`` when a term of ``loss`` reads them, and finite inputs (each read is a host
    synchronisation)."""
    if targets is not None and targets.numel() and labels_read_by(loss):
        low, high = int(targets.min()), int(targets.max())
        if low < 0 or high >= num_classes:
            raise UserError(f"targets hold labels from {low} to {high}, but the models classify {num_classes} "
                            f"classes; labels must be 0 to {num_classes - 1}")
    if not bool(torch.isfinite(inputs).all()):
        raise UserError("the inputs hold NaN or infinite values; check the data and its normalisation (a "
                        "zero standard deviation divides by zero)")


def check_optimizer(optimizer: object, trainable: Sequence[Tensor]) -> None:
    """An optimizer that holds none of the trainable parameters would make every step a silent no-op."""
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise UserError(f"step(optimizer, ...) takes a torch.optim.Optimizer, got {type(optimizer).__name__}")
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    if not any(id(p) in held for p in trainable):
        raise UserError("the optimizer holds none of the Distiller's trainable parameters, so step() would "
                        "train nothing; build it with torch.optim.AdamW(distiller.trainable_parameters(), ...)")
