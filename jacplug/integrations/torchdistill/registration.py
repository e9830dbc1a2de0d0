"""torchdistill bridge: jacplug's loss terms, input-gradient forward procedures, models and the
embedded digits dataset, registered in torchdistill's own registries.

Importing this module registers everything (torchdistill has no entry points: its plugins are
imported modules, e.g. through a config's ``dependencies:`` list); :func:`register_with_torchdistill`
does the same explicitly and is idempotent. A key that torchdistill (or anything else) already uses
for another object is refused with :class:`TorchdistillNameCollision`, since torchdistill itself
would silently overwrite it.

Keys (see docs/torchdistill.md):

- mid-level losses: ``JacobianMatchingLoss`` (Eq. 10), ``JacobianProjectedLoss``,
  ``JacobianDirectionalLoss`` and ``JacplugLoss`` (any jacplug term by name);
- high-level loss: ``JacplugWeightedSumLoss`` (torchdistill's ``WeightedSumLoss`` that also keeps
  each sub-term's value for the log);
- forward procedures: ``jacplug_student_input_grad`` and ``jacplug_teacher_input_grad``. torchdistill
  runs a frozen teacher under ``torch.no_grad()``, which leaves nothing to differentiate; these run
  both models on one detached alias of the batch that requires grad (the batch itself is not
  changed), and the teacher with grad re-enabled w.r.t. the inputs only (its parameters must be
  frozen, so no parameter gradient or graph is built for them);
- post-epoch process: ``jacplug_post_epoch_process`` (logs each term's epoch mean and gives
  ``ReduceLROnPlateau`` its metric);
- model: ``jacplug_model`` (any model in jacplug's registry, e.g. every timm model);
- dataset: :func:`digits_dataset`, called from a config with ``!import_call``.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import Tensor, nn

from jacplug.engine.substitutions import double_differentiable
from jacplug.losses.extra_evaluation import extra_evaluation

try:
    import torchdistill  # noqa: F401  (only to fail early with an install hint)
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "jacplug_plugins.torchdistill_bridge needs torchdistill; install it with: pip install 'jacplug[torchdistill]'"
    ) from exc

from .torchdistill_epoch import JacplugWeightedSumLoss, post_epoch_process
from .torchdistill_losses import JacobianDirectionalLoss, JacobianMatchingLoss, JacobianProjectedLoss, JacplugLoss
from .torchdistill_step import STUDENT_PROC, TEACHER_PROC, BridgeConfigError, StepRecord, attach, input_leaf


class TorchdistillNameCollision(BridgeConfigError):
    """A bridge key is already registered in torchdistill for a different object."""


def _input_batch(sample_batch: Any) -> Tensor:
    """The step's shared input leaf ``[B, *S]`` (requires grad); ``sample_batch`` itself is left as it is."""
    if not isinstance(sample_batch, Tensor) or not sample_batch.is_floating_point():
        raise BridgeConfigError(
            f"jacplug's forward procedures need the sample batch as a floating-point tensor [B, *S], got "
            f"{type(sample_batch).__name__}{'' if not isinstance(sample_batch, Tensor) else ' ' + str(sample_batch.dtype)}"
        )
    return input_leaf(sample_batch)


def student_forward_input_grad(model: nn.Module, sample_batch: Tensor, targets: Any = None, supp_dict: Any = None, **_: Any) -> Tensor:
    """Student forward procedure: logits ``[B, C]`` computed from inputs that require grad, so the
    loss can differentiate them w.r.t. the inputs (``create_graph=True``) and train the student.

    The forward runs inside :func:`jacplug.double_differentiable`: the Jacobian terms back-propagate
    through the student's backward pass, which fused attention and hard-sigmoid cannot take part in;
    their registered substitutions compute the same values and first derivatives (the procedure
    cannot see which terms follow, and models without those ops run unchanged).
    """
    inputs = _input_batch(sample_batch)
    with double_differentiable():
        logits = model(inputs)
    return attach(logits, StepRecord(inputs=inputs, fn=extra_evaluation(model), model=model))


def teacher_forward_input_grad(model: nn.Module, sample_batch: Tensor, targets: Any = None, supp_dict: Any = None, **_: Any) -> Tensor:
    """Teacher forward procedure: the frozen teacher in eval mode, with grad enabled w.r.t. the inputs.

    torchdistill calls this inside ``torch.no_grad()``; grad is switched back on here on purpose:
    the Jacobian terms need ``d teacher / d inputs``, and taking it from this forward pass saves
    running the teacher a second time. The parameters are frozen (checked), so the graph reaches
    the inputs only and holds no parameter gradient.

    Returns the logits ``[B, C]`` detached (torchdistill's own losses see what they always see) with
    the on-graph logits on the attached record for jacplug's Jacobian terms, which take the teacher
    rows with ``create_graph=False`` and so free the teacher's graph. When torchdistill hooks
    teacher modules (``forward_hook``), their outputs would carry that graph into torchdistill's
    feature losses, which do not detach them: then the teacher runs without grad, as torchdistill
    runs it, and the Jacobian terms re-run it on the inputs (one extra teacher forward per step).
    """
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    if trainable:
        raise BridgeConfigError(
            f"{TEACHER_PROC!r} needs a frozen teacher, but {len(trainable)} teacher parameter(s) require grad "
            f"(e.g. {trainable[0]!r}); set `requires_grad: False` under train.teacher in the config"
        )
    if model.training:
        model.eval()  # BatchNorm in train mode would couple the samples' Jacobians
    inputs = _input_batch(sample_batch)
    hooked = any(module._forward_hooks for module in model.modules())
    with torch.set_grad_enabled(not hooked):
        logits = model(inputs)
    record = StepRecord(inputs=inputs, fn=extra_evaluation(model), model=model, graph_logits=None if hooked else logits)
    return attach(logits.detach(), record)


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Any model in jacplug's registry (every timm name), e.g. ``{name: resnet10t, num_classes: 10, in_chans: 1}``."""
    from jacplug.registry import create_model as create

    return create(name, **kwargs)


def digits_dataset(split: str = "train", image_size: int = 16, samples_per_class: int | None = None, seed: int = 0):
    """One split (``train``/``val``/``test``) of jacplug's embedded digits: ``(image [1, H, W], label)``.

    ``samples_per_class`` keeps that many training images per class, chosen by ``seed`` (the
    few-sample setting of docs/results.md); it applies to the train split only.
    """
    from jacplug.pipeline.data import few_sample_subset
    from jacplug.registry import create_dataset

    splits = create_dataset("digits", image_size=image_size)
    if split not in ("train", "val", "test"):
        raise BridgeConfigError(f"digits split must be 'train', 'val' or 'test', got {split!r}")
    if samples_per_class is not None:
        if split != "train":
            raise BridgeConfigError(f"samples_per_class applies to the train split only, got split={split!r}")
        splits = few_sample_subset(splits, samples_per_class, seed)
    return getattr(splits, split)


def _registries() -> list[tuple[str, dict, dict[str, Any], tuple[dict, ...]]]:
    """``(kind, target registry, our entries, registries whose keys we must not shadow)``."""
    from torchdistill.core.interfaces import registry as procs
    from torchdistill.losses import registry as losses
    from torchdistill.models import registry as models

    return [
        (
            "mid-level loss",
            losses.MIDDLE_LEVEL_LOSS_DICT,
            {
                "JacobianMatchingLoss": JacobianMatchingLoss,
                "JacobianProjectedLoss": JacobianProjectedLoss,
                "JacobianDirectionalLoss": JacobianDirectionalLoss,
                "JacplugLoss": JacplugLoss,
            },
            # get_mid_level_loss falls back to these, so a mid-level key would hide one of them
            (losses.LOW_LEVEL_LOSS_DICT, losses.LOSS_DICT),
        ),
        ("high-level loss", losses.HIGH_LEVEL_LOSS_DICT, {"JacplugWeightedSumLoss": JacplugWeightedSumLoss}, ()),
        (
            "forward procedure",
            procs.FORWARD_PROC_FUNC_DICT,
            {STUDENT_PROC: student_forward_input_grad, TEACHER_PROC: teacher_forward_input_grad},
            (),
        ),
        ("post-epoch process", procs.POST_EPOCH_PROC_FUNC_DICT, {"jacplug_post_epoch_process": post_epoch_process}, ()),
        ("model", models.MODEL_DICT, {"jacplug_model": create_model}, ()),
    ]


def register_with_torchdistill() -> dict[str, list[str]]:
    """Register the bridge's keys in torchdistill; returns ``{kind: [keys]}``.

    Idempotent. Checks every key before registering any, so a collision leaves torchdistill untouched.
    """
    plan = _registries()
    for kind, target, entries, shadowed in plan:
        for key, obj in entries.items():
            for registry in (target, *shadowed):
                if key in registry and registry[key] is not obj:
                    raise TorchdistillNameCollision(
                        f"cannot register jacplug's {kind} {key!r} in torchdistill: the key is already taken by "
                        f"{_describe(registry[key])}; jacplug refuses to overwrite it (torchdistill would do so "
                        f"silently). Rename or unregister the other {kind}"
                    )
    for _, target, entries, _ in plan:
        target.update(entries)
    return {kind: sorted(entries) for kind, _, entries, _ in plan}


def _describe(obj: Callable[..., Any]) -> str:
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


register_with_torchdistill()
