"""The preprocessing a run applies: the student's own timm data configuration, with the user's overrides.

Why the student's: it is the model the run produces and whose checkpoint a user hands to timm's tooling;
the teacher sees the student's tensors (renormalised when its checkpoint records other statistics,
:func:`jacplug.data.preprocess.renormalize`). The configuration is read before the data is loaded,
so the model is built on PyTorch's ``meta`` device (no memory, no weights, no random draws): the
``pretrained_cfg`` of its name, tag included (``vit_tiny_patch16_224.augreg_in21k`` declares mean and
std 0.5), or of a ``pretrained_cfg_overlay`` among its kwargs, through ``timm.data.resolve_data_config``.
"""

from __future__ import annotations

from typing import Any

import torch

from ..data.preprocess import Preprocessing


def model_data_config(name: str, kwargs: dict[str, Any] | None = None) -> dict[str, Any] | None:
    """``timm.data.resolve_data_config(model=...)`` for the registered model ``name`` built with
    ``kwargs``, or ``None`` when it declares no ``pretrained_cfg`` (a plugin's model) or cannot be built
    (the model build reports that later, in its own words)."""
    from timm.data import resolve_data_config

    from ..registry import create_model

    options = {k: v for k, v in (kwargs or {}).items() if k != "img_size"}  # the size is the run's, not the model's
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = create_model(name, num_classes=2, **options)
    except Exception:  # a bad name or kwarg: build_model names it, with the remedy
        return None
    if not getattr(model, "pretrained_cfg", None):
        return None
    return resolve_data_config(model=model)


def student_preprocessing(config: Any) -> Preprocessing | None:
    """The preprocessing of ``config``'s student (``student``, ``student_kwargs``) with the
    ``interpolation``/``crop_pct`` overrides and the augmentation options (``aa``, ``reprob``, ``scale``,
    ``ratio``) where the configuration has them. ``None`` mean/std: the student declares none, and the
    dataset keeps its own statistics."""
    from ..specs import model_options

    student = model_options({"student": config.student, "student_kwargs": getattr(config, "student_kwargs", {})})
    declared = model_data_config(student["student"], student.get("student_kwargs") or {}) or {}
    interpolation = getattr(config, "interpolation", None) or declared.get("interpolation", "bilinear")
    crop_pct = getattr(config, "crop_pct", None) or declared.get("crop_pct", 1.0)
    scale, ratio = getattr(config, "scale", None), getattr(config, "ratio", None)
    return Preprocessing(
        mean=tuple(declared["mean"]) if declared else None, std=tuple(declared["std"]) if declared else None,
        interpolation=interpolation, crop_pct=float(crop_pct), crop_mode=declared.get("crop_mode", "center"),
        auto_augment=getattr(config, "aa", None), re_prob=float(getattr(config, "reprob", 0.0) or 0.0),
        scale=tuple(scale) if scale else None, ratio=tuple(ratio) if ratio else None)
