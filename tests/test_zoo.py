"""Every Jacobian term on students from 30 timm families, through the start-up probe that
`jacplug train` and `jacplug check` run: the exact terms' double backward, forward mode (checked
against reverse mode), finite differences and noise, each reaching the student's parameters.

Small members of each family at 32 px (depths and widths cut where timm's constructors allow it), so
the whole zoo stays within the suite's budget; marked ``slow``.
"""

from __future__ import annotations

import pytest
import timm
import torch

from jacplug.losses import build_loss
from jacplug.pipeline.device import Runtime
from jacplug.pipeline.probe import probe_terms

VIT = dict(img_size=32, patch_size=8, depth=1, embed_dim=48, num_heads=2)

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
    "pit": ("pit_ti_224", dict(img_size=32)),
    "levit": ("levit_128s", dict(img_size=32)),
    "mixer": ("mixer_s16_224", dict(img_size=32, patch_size=8, num_blocks=1, embed_dim=64)),
    "resmlp": ("resmlp_12_224", dict(img_size=32, patch_size=8, depth=1, embed_dim=64)),
    "poolformer": ("poolformer_s12", {}),
    "coat": ("coat_lite_tiny", dict(img_size=32)),
    "tinyvit": ("tiny_vit_5m_224", dict(img_size=32)),
    "swin": ("swin_tiny_patch4_window7_224", dict(img_size=32, window_size=2, depths=(1, 1, 1, 1))),
}

TERMS = [
    "kd=1",
    "jacobian=1",
    "jacobian-projected=1",
    "jacobian-direction=1",
    "jacobian-direction=1:method=finite-difference",
    "noisy-distill=1",
]


@pytest.fixture(scope="module")
def teacher() -> torch.nn.Module:
    torch.manual_seed(0)
    return timm.create_model("resnet10t", num_classes=10).eval().requires_grad_(False)


@pytest.mark.slow
@pytest.mark.parametrize("family", list(ZOO))
def test_every_jacobian_term_trains_the_family(family, teacher):
    name, kwargs = ZOO[family]
    torch.manual_seed(0)
    student = timm.create_model(name, num_classes=10, **kwargs).train()
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
    loss = build_loss(TERMS)
    report = probe_terms(loss, student, teacher, x, y, Runtime(device=torch.device("cpu")), name)
    assert {r.name: r.status for r in report} == dict.fromkeys(loss.terms, "ok"), report
