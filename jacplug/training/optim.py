"""The optimizer of both training phases: AdamW from timm's factory, so norm and bias parameters
get no weight decay.

Why: weight decay pulls a parameter towards zero. For convolution and linear weights that is the
intended regulariser, but a BatchNorm/LayerNorm scale pulled towards zero shrinks its channel's
output, and a bias has no scale to regularise. timm (like most ImageNet training recipes) therefore
exempts every parameter with at most one dimension, every ``.bias``, and the names a model lists in
its ``no_weight_decay()`` (position embeddings, class tokens); :func:`timm.optim.create_optimizer_v2`
builds those two parameter groups.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn


class _Trained(nn.Module):
    """The modules one optimizer trains, under one root, so timm's factory sees every parameter's name."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        super().__init__()
        for name, module in modules.items():
            self.add_module(name, module)

    def no_weight_decay(self) -> set[str]:
        """Each module's own ``no_weight_decay()`` names, prefixed with its name here."""
        names: set[str] = set()
        for prefix, module in self.named_children():
            exempt = getattr(module, "no_weight_decay", None)
            if callable(exempt):
                names |= {f"{prefix}.{name}" for name in exempt()}
        return names


def create_adamw(
    modules: Mapping[str, nn.Module], lr: float, weight_decay: float, fused: bool = False
) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters of ``modules`` (e.g. ``{"student": ..., "loss": ...}``):
    a group with ``weight_decay`` for weight matrices and kernels, and a group with none for norm
    parameters, biases and the models' ``no_weight_decay()`` names. ``fused``: torch's one-kernel
    CUDA implementation (parameters on CUDA only)."""
    from timm.optim import create_optimizer_v2

    extra = {"fused": True} if fused else {}
    return create_optimizer_v2(_Trained(modules), opt="adamw", lr=lr, weight_decay=weight_decay, **extra)
