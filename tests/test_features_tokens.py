"""Feature maps of token models: ``FeatureTap.maps()`` / ``feature_map`` against timm's own
``forward_intermediates``, the refusals, and a CNN teacher -> ViT student feature term in the pipeline.

Every model is a timm architecture shrunk through its kwargs (a few thousand parameters, 16 px inputs).
"""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

from jacplug.features import FeatureTap, FeatureTapError, feature_map, forward_intermediates
from jacplug.losses import AttentionTransferLoss, DistillBatch, KDLoss, WeightedLoss
from jacplug.distiller import Distiller

TINY = dict(img_size=16, patch_size=4, depth=1, embed_dim=32, num_heads=2)
#: (model, kwargs, tapped layer): class, distillation and register tokens, CaiT's patch-only blocks,
#: a dynamic-size ViT, and Swin's channels-last stages
TOKEN_MODELS = [
    ("vit_tiny_patch16_224", TINY, "blocks.0"),
    ("vit_tiny_patch16_224", {**TINY, "reg_tokens": 2, "class_token": False, "global_pool": "avg"}, "blocks.0"),
    ("deit_tiny_distilled_patch16_224", TINY, "blocks.0"),
    ("cait_xxs24_224", {**TINY, "depth_token_only": 1}, "blocks.0"),
    ("test_vit", dict(patch_size=4, depth=1), "blocks.0"),
    ("swin_tiny_patch4_window7_224", dict(img_size=16, embed_dim=16, depths=(1, 1), num_heads=(1, 1), window_size=2),
     "layers.1"),
]


def tiny(name: str, kwargs: dict) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, num_classes=3, in_chans=1, **kwargs).eval()


@pytest.mark.parametrize("name, kwargs, layer", TOKEN_MODELS, ids=[f"{n}-{i}" for i, (n, _, _) in enumerate(TOKEN_MODELS)])
def test_maps_equal_timm_forward_intermediates(name, kwargs, layer):
    model = tiny(name, kwargs)
    x = torch.randn(2, 1, 16, 16)
    with FeatureTap(model, [layer]) as tap:
        model(x)
    raw, converted = tap[layer], tap.maps()[layer]
    assert raw.dim() in (3, 4) and converted.dim() == 4 and converted.shape != raw.shape
    _, reference = forward_intermediates(model, x, [layer])
    torch.testing.assert_close(converted, reference[layer])  # same values in the same [B, C, H, W] places


def test_dynamic_size_models_take_the_grid_from_the_input():
    model = tiny("test_vit", dict(patch_size=4, depth=1))  # built for 224 px, dynamic_img_size=True
    for size, grid in ((8, (2, 2)), (16, (4, 4))):
        with FeatureTap(model, ["blocks.0"]) as tap:
            model(torch.randn(1, 1, size, size))
        assert tap.maps()["blocks.0"].shape == (1, 64, *grid)


def test_maps_stay_on_the_graph_and_leave_cnn_maps_alone():
    model = tiny("vit_tiny_patch16_224", TINY).train()
    with FeatureTap(model, ["blocks.0", "patch_embed.proj"], keep_all=False) as tap:
        model(torch.randn(2, 1, 16, 16))
    maps = tap.maps()
    assert maps["patch_embed.proj"] is tap["patch_embed.proj"]  # already [B, C, H, W]
    maps["blocks.0"].pow(2).mean().backward()
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def test_what_the_model_does_not_describe_is_refused():
    vit = tiny("vit_tiny_patch16_224", TINY)
    with pytest.raises(FeatureTapError, match=r"gives 7 tokens of width 32, which do not fill .*\(4x4\) after its 1"):
        feature_map(vit, "blocks.0", torch.zeros(2, 7, 32), (16, 16))
    swin = tiny(*TOKEN_MODELS[-1][:2])
    with FeatureTap(swin, ["layers.1.blocks.0"]) as tap:
        swin(torch.randn(1, 1, 16, 16))
    with pytest.raises(FeatureTapError, match="channels-last, and module 'layers.1.blocks.0'.* is not in its feature_info"):
        tap.maps()
    with pytest.raises(FeatureTapError, match="returned a tuple, not a tensor"):
        feature_map(vit, "x", (torch.zeros(1, 2, 2, 2),))


def test_feature_terms_point_token_users_to_maps():
    tokens = torch.randn(2, 17, 32, requires_grad=True)
    batch = DistillBatch(inputs=torch.zeros(2, 1, 16, 16), student_logits=torch.zeros(2, 3),
                         student_features={"blocks.0": tokens}, teacher_features={"layer1": torch.randn(2, 8, 4, 4)})
    with pytest.raises(ValueError, match=r"FeatureTap\(\.\.\.\)\.maps\(\)"):
        AttentionTransferLoss({"blocks.0": "layer1"})(batch)


def test_a_compiled_model_is_refused_with_a_clear_error():
    compiled = torch.compile(nn.Sequential(nn.Linear(2, 2)))  # compiles lazily: nothing is traced here
    with pytest.raises(FeatureTapError, match=r"torch.compile'd model .*_orig_mod.*forward_intermediates"):
        FeatureTap(compiled, ["_orig_mod.0"])


def test_distiller_trains_a_vit_student_on_a_cnn_teachers_attention():
    student = tiny("vit_tiny_patch16_224", TINY).train()
    teacher = tiny("test_resnet", {}).requires_grad_(False)  # layer1 of a 16 px input: [B, 32, 4, 4]
    loss = WeightedLoss({"kd": (KDLoss(), 1.0), "attention": (AttentionTransferLoss({"blocks.0": "layer1"}), 1.0)})
    values = Distiller(student, teacher, loss)(torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 0]))
    assert values["attention"] > 0
    (grad,) = torch.autograd.grad(values["attention"], student.patch_embed.proj.weight)
    assert grad.abs().sum() > 0
