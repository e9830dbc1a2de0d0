"""How a decoded image becomes the tensor a model sees: timm's data configuration (the student's), its
evaluation transform, and its training augmentation.

Why timm's: a pretrained timm model declares its own preprocessing in ``pretrained_cfg`` (mean/std, often
ImageNet's but 0.5/0.5 for many ViTs; bicubic resizing; a centre crop of 0.875-0.95 of the resized
image), and a model fed other statistics or another crop starts from a shifted input. The run resolves
the student's configuration with ``timm.data.resolve_data_config(model=...)``
(:func:`jacplug.models.data_config.student_preprocessing`), builds the transforms with
``timm.data.create_transform``, and records the result in every checkpoint's ``pretrained_cfg``, so
``resolve_data_config(model=jacplug.load_model(path))`` gives back exactly what was applied.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from ..errors import UserError


@dataclass(frozen=True)
class Preprocessing:
    """timm's data keys (``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``) and the
    training augmentation of timm's ``create_transform`` (``auto_augment``: a RandAugment/AutoAugment
    spec such as ``rand-m9-mstd0.5``; ``re_prob``: random erasing; ``scale``/``ratio``: the random
    resized crop's area and aspect ranges, ``None`` for timm's ``(0.08, 1)`` and ``(3/4, 4/3)``).
    ``mean``/``std`` ``None``: the model declares none; the dataset fills in its own (:meth:`filled`)."""

    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    crop_mode: str = "center"
    auto_augment: str | None = None
    re_prob: float = 0.0
    scale: tuple[float, float] | None = None
    ratio: tuple[float, float] | None = None

    def filled(self, mean: tuple[float, ...], std: tuple[float, ...]) -> "Preprocessing":
        """These settings, with ``mean``/``std`` where none were declared."""
        return self if self.mean is not None else dataclasses.replace(self, mean=tuple(mean), std=tuple(std))

    def transforms(self, size: int, augment: bool) -> tuple[Callable, Callable]:
        """``(train, eval)`` transforms from PIL images to normalised ``[C, size, size]`` tensors.

        Evaluation resizes the shorter side to ``size / crop_pct`` and centre-crops ``size`` (timm's
        ``transforms_imagenet_eval``). Training is timm's random resized crop, flip, colour jitter, and
        ``auto_augment``/``re_prob`` when given; without ``augment`` it is the evaluation transform, so
        every epoch sees the same tensor (what the teacher cache needs)."""
        from timm.data import create_transform

        common = dict(input_size=(len(self.mean), size, size), interpolation=self.interpolation, mean=self.mean,
                      std=self.std)
        evaluate = create_transform(**common, is_training=False, crop_pct=self.crop_pct, crop_mode=self.crop_mode)
        if not augment:
            return evaluate, evaluate
        try:
            train = create_transform(**common, is_training=True, auto_augment=self.auto_augment,
                                     re_prob=self.re_prob, scale=self.scale, ratio=self.ratio)
        except (AssertionError, ValueError, KeyError) as exc:  # timm asserts on a spec it cannot parse
            raise UserError(f"--aa {self.auto_augment!r} is not an augmentation timm knows ({exc or 'unparsable'}); "
                            "use rand-mM[-nN][-mstdS] (RandAugment, e.g. rand-m9-mstd0.5), augmix-mM, "
                            "original or v0 (AutoAugment)") from exc
        return train, evaluate


class Renormalize(nn.Module):
    """``[B, C, H, W]`` normalised with one mean/std -> normalised with another:
    ``(x * std_from + mean_from - mean_to) / std_to``, an affine map a teacher's Jacobian rows go through
    when it was trained on other statistics than the data it is fed (the Distiller's ``teacher_input``)."""

    def __init__(self, mean_from, std_from, mean_to, std_to) -> None:
        super().__init__()
        for name, value in (("mean_from", mean_from), ("std_from", std_from), ("mean_to", mean_to),
                            ("std_to", std_to)):
            self.register_buffer(name, torch.as_tensor(value, dtype=torch.float32).reshape(1, -1, 1, 1),
                                 persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return (x * self.std_from + self.mean_from - self.mean_to) / self.std_to


def renormalize(mean_from, std_from, mean_to, std_to) -> Renormalize | None:
    """The map from one normalisation to another, or ``None`` when they are the same (to 1e-6)."""
    same = all(len(a) == len(b) and all(abs(float(x) - float(y)) <= 1e-6 for x, y in zip(a, b))
               for a, b in ((mean_from, mean_to), (std_from, std_to)))
    return None if same else Renormalize(mean_from, std_from, mean_to, std_to)
