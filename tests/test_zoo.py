"""Jacobian terms on students from 32 timm families, through the start-up probe that `jacplug train`
and `jacplug check` run: for every family the double backward of the exact terms and forward mode
(checked against reverse mode), each reaching the student's parameters; every term, finite
differences and noise included, on a CNN and a ViT.

Small members of each family at 16 px (depths and widths cut where timm's constructors allow it), so
the whole zoo stays within the suite's budget; marked ``slow``.
"""

from __future__ import annotations

import pytest
import timm
import torch

from jacplug.losses import (
    DirectionalJacobianLoss,
    JacobianLoss,
    KDLoss,
    NoisyDistillLoss,
    ProjectedJacobianLoss,
    WeightedLoss,
)
from jacplug.distiller import Distiller

SIZE = 16  # the embedded digits' size; stride-32 networks end in 1x1 maps, as at 32 px
#: families whose pooling or stage layout needs a larger input
LARGER = {"densenet": 32, "dla": 32, "convnext": 32, "convnextv2": 32, "edgenext": 32, "coat": 32, "swin": 32}
VIT = dict(img_size=SIZE, patch_size=8, depth=1, embed_dim=48, num_heads=2)

#: family -> (timm name, constructor keyword arguments)
ZOO = {
    "resnet": ("resnet10t", {}),
    "regnet": ("regnetx_002", {}),
    "efficientnet": ("test_efficientnet", {}),
    "mobilenetv2": ("mobilenetv2_035", {}),
    "mobilenetv3": ("mobilenetv3_small_050", {}),
    "mobilenetv4": ("mobilenetv4_conv_small_035", {}),
    "lcnet": ("lcnet_035", {}),
    "ghostnet": ("ghostnet_050", {}),
    "hardcorenas": ("hardcorenas_a", {}),
    "fbnetv3": ("fbnetv3_b", {}),
    "rexnet": ("rexnet_100", {}),
    "mnasnet": ("mnasnet_small", {}),
    "densenet": ("densenet121", {}),
    "dla": ("dla46_c", {}),
    "convnext": ("convnext_atto", dict(depths=(1, 1, 1, 1))),
    "convnextv2": ("convnextv2_atto", dict(depths=(1, 1, 1, 1))),
    "edgenext": ("edgenext_xx_small", {}),
    "mobilevit": ("mobilevit_xxs", {}),
    "fastvit": ("fastvit_t8", {}),
    "repvit": ("repvit_m0_9", {}),
    "efficientvit": ("efficientvit_b0", {}),
    "vit": ("vit_tiny_patch16_224", VIT),
    "deit": ("deit_tiny_patch16_224", VIT),
    "cait": ("cait_xxs24_224", VIT),
    "pit": ("pit_ti_224", dict(img_size=SIZE)),
    "levit": ("levit_128s", dict(img_size=SIZE)),
    "mixer": ("mixer_s16_224", dict(img_size=SIZE)),
    "resmlp": ("resmlp_12_224", dict(img_size=SIZE)),
    "poolformer": ("poolformer_s12", {}),
    "coat": ("coat_lite_tiny", dict(img_size=32)),
    "tinyvit": ("tiny_vit_5m_224", {}),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, window_size=2, depths=(1, 1, 1, 1))),
}

def every_term() -> WeightedLoss:
    """KD plus each Jacobian term once: the exact row (double backward), random projections, input
    directions by forward mode and by finite differences, and noisy-input distillation."""
    return WeightedLoss({
        "kd": (KDLoss(), 1.0),
        "jacobian": (JacobianLoss(), 1.0),
        "jacobian-projected": (ProjectedJacobianLoss(), 1.0),
        "direction-forward": (DirectionalJacobianLoss(method="forward"), 1.0),
        "direction-fd": (DirectionalJacobianLoss(method="finite-difference"), 1.0),
        "noisy-distill": (NoisyDistillLoss(), 1.0),
    })


def derivative_paths() -> WeightedLoss:
    """One term per way of differentiating the student that can fail for an architecture: the
    double backward (the exact and projected terms share it) and forward-over-reverse. Finite
    differences and noise take only first derivatives, which every trainable student has."""
    return WeightedLoss({
        "kd": (KDLoss(), 1.0),
        "jacobian": (JacobianLoss(), 1.0),
        "direction-forward": (DirectionalJacobianLoss(method="forward"), 1.0),
    })


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=10).eval().requires_grad_(False)


def probe(family: str, loss: WeightedLoss, teacher: torch.nn.Module) -> None:
    name, kwargs = ZOO[family]
    torch.manual_seed(0)
    student = timm.create_model(name, num_classes=10, **kwargs).train()
    g = torch.Generator().manual_seed(0)
    size = LARGER.get(family, SIZE)
    x, y = torch.randn(4, 3, size, size, generator=g), torch.randint(0, 10, (4,), generator=g)
    report = Distiller(student, teacher, loss, name=name).check(x, y)
    assert {r.name: r.status for r in report} == dict.fromkeys(loss.terms, "ok"), report


@pytest.mark.slow
@pytest.mark.parametrize("family", list(ZOO))
def test_both_higher_derivatives_work_for_the_family(family, teacher):
    probe(family, derivative_paths(), teacher)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["resnet", "vit"])
def test_every_jacobian_term_trains_a_cnn_and_a_vit(family, teacher):
    probe(family, every_term(), teacher)
