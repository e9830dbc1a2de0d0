"""The bridge's keys in torchdistill's own registries: loss adapters, forward procedures, the pre- and
post-epoch processes, and models from jacplug's registry.

Why a registration module and not a jacplug plugin: torchdistill has no entry points; its plugins are
modules imported through a config's ``dependencies:`` list, which fill its registries (plain dicts) as
they are imported. Importing :mod:`jacplug.integrations.torchdistill` calls
:func:`register_with_torchdistill`, which is idempotent and refuses a key that torchdistill (or anything
else) already uses for another object with :class:`TorchdistillNameCollision`, since torchdistill itself
would silently overwrite it. docs/torchdistill.md lists every key.
"""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from .epoch import JacplugWeightedSumLoss, post_epoch_process
from .losses import JacobianDirectionalLoss, JacobianMatchingLoss, JacobianProjectedLoss, JacplugLoss
from .procedures import pre_epoch_process, student_forward, teacher_forward
from .step import PRE_EPOCH_PROC, STUDENT_PROC, TEACHER_PROC, BridgeConfigError


class TorchdistillNameCollision(BridgeConfigError):
    """A bridge key is already registered in torchdistill for a different object."""


def create_model(name: str, **kwargs: Any) -> nn.Module:
    """Any model in jacplug's registry (every timm name), e.g. ``{name: resnet10t, num_classes: 10, in_chans: 1}``."""
    from ...registry import create_model as create

    return create(name, **kwargs)


def digits_dataset(split: str = "train", image_size: int = 16, samples_per_class: int | None = None, seed: int = 0):
    """One split (``train``/``val``/``test``) of jacplug's embedded digits: ``(image [1, H, W], label)``.

    ``samples_per_class`` keeps that many training images per class, chosen by ``seed`` (the
    few-sample setting of docs/results.md); it applies to the train split only.
    """
    from ...data.datasets import few_sample_subset
    from ...registry import create_dataset

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
            {STUDENT_PROC: student_forward, TEACHER_PROC: teacher_forward},
            (),
        ),
        ("pre-epoch process", procs.PRE_EPOCH_PROC_FUNC_DICT, {PRE_EPOCH_PROC: pre_epoch_process}, ()),
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

