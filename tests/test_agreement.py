"""jacplug.agreement: held-out agreement of input gradients, checked against a hand computation with
torch.autograd.functional.jacobian, and the gradient-map picture read back with PIL."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from PIL import Image
from torch import nn

from jacplug.agreement import gradient_map_figure, gradient_maps, input_gradient_agreement, predicted_classes
from jacplug.losses import JacobianLoss
from jacplug.losses.base import DistillBatch


def batchnorm_cnn(seed: int) -> nn.Module:
    """A CNN whose BatchNorm has non-trivial running statistics (one train-mode pass)."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(4), nn.Flatten(),
        nn.Linear(64, 5),
    ).double()
    with torch.no_grad():
        model(torch.randn(16, 1, 8, 8, dtype=torch.float64) * 2 + 1)
    return model


def tiny_vit(seed: int) -> nn.Module:
    """LayerNorm and fused attention (one backward pass is all the metric needs)."""
    torch.manual_seed(seed)
    return timm.create_model(
        "vit_tiny_patch16_224", img_size=8, patch_size=4, in_chans=1, depth=1, embed_dim=16, num_heads=2, num_classes=5
    ).double()


def hand_rows(model: nn.Module, images: torch.Tensor, classes: torch.Tensor) -> torch.Tensor:
    """``[N, H*W]``: row ``classes[n]`` of each image's full Jacobian, one image at a time."""
    model.eval()
    rows = []
    for image, cls in zip(images, classes):
        full = torch.autograd.functional.jacobian(lambda x: model(x.unsqueeze(0))[0], image)  # [C, 1, H, W]
        rows.append(full[cls].flatten())
    return torch.stack(rows)


def unit(rows: torch.Tensor) -> torch.Tensor:
    return rows / rows.norm(dim=-1, keepdim=True).clamp_min(1e-8)


@pytest.mark.parametrize("student_factory", [batchnorm_cnn, tiny_vit], ids=["batchnorm-cnn", "vit"])
def test_agreement_equals_a_hand_computation(student_factory):
    teacher, student = batchnorm_cnn(0), student_factory(1)
    images = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    got = input_gradient_agreement(student, teacher, images, batch_size=4)  # two chunks: 4 + 2

    with torch.no_grad():
        classes = teacher.eval()(images).argmax(1)
    t_rows, s_rows = hand_rows(teacher, images, classes), hand_rows(student, images, classes)
    cosine = torch.nn.functional.cosine_similarity(t_rows, s_rows, dim=1)
    distance = (unit(t_rows) - unit(s_rows)).pow(2).sum(1)
    assert got == pytest.approx({"agreement_cosine": cosine.mean().item(), "agreement_distance": distance.mean().item()},
                                rel=1e-10, abs=1e-12)
    assert got["agreement_distance"] == pytest.approx(2 - 2 * got["agreement_cosine"], abs=1e-10)


def test_the_distance_is_the_jacobian_loss_terms_value():
    teacher, student = batchnorm_cnn(0).eval(), tiny_vit(1).eval()
    images = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    inputs = images.clone().requires_grad_(True)
    batch = DistillBatch(inputs=inputs, student_logits=student(inputs), teacher_logits=teacher(inputs), teacher_fn=teacher)
    eq10 = JacobianLoss()(batch).item()
    assert input_gradient_agreement(student, teacher, images)["agreement_distance"] == pytest.approx(eq10, rel=1e-12)


def test_projected_estimate_equals_a_hand_computation():
    teacher, student = batchnorm_cnn(0), batchnorm_cnn(1)
    images = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    got = input_gradient_agreement(
        student, teacher, images, projections=3, generator=torch.Generator().manual_seed(7)
    )
    v = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    full = {}
    for name, model in (("teacher", teacher), ("student", student)):
        model.eval()
        jac = torch.stack([torch.autograd.functional.jacobian(lambda x: model(x.unsqueeze(0))[0], im) for im in images])
        full[name] = torch.einsum("bkc,bcn->bkn", v, jac.flatten(2))
    t, s = unit(full["teacher"]), unit(full["student"])
    assert got["agreement_projected_distance"] == pytest.approx((t - s).pow(2).sum(-1).mean().item(), rel=1e-10)
    assert got["agreement_projected_cosine"] == pytest.approx((t * s).sum(-1).mean().item(), rel=1e-10)
    assert set(got) == {"agreement_cosine", "agreement_distance", "agreement_projected_cosine",
                        "agreement_projected_distance"}


@pytest.mark.parametrize("factory", [batchnorm_cnn, tiny_vit], ids=["batchnorm-cnn", "vit"])
def test_a_copy_of_the_teacher_agrees_perfectly(factory):
    teacher = factory(0).float()
    student = copy.deepcopy(teacher)
    got = input_gradient_agreement(student, teacher, torch.randn(7, 1, 8, 8), projections=2)
    assert got["agreement_distance"] == 0.0 and got["agreement_projected_distance"] == 0.0
    assert got["agreement_cosine"] == pytest.approx(1.0, abs=1e-6)
    assert got["agreement_projected_cosine"] == pytest.approx(1.0, abs=1e-6)


def test_measuring_changes_nothing():
    teacher, student = batchnorm_cnn(0), batchnorm_cnn(1)
    student.train()
    student[1].eval()  # a submodule in its own mode stays so
    states = [copy.deepcopy(m.state_dict()) for m in (teacher, student)]
    modes = [[m.training for m in model.modules()] for model in (teacher, student)]
    images = torch.randn(6, 1, 8, 8, dtype=torch.float64)
    rng = torch.get_rng_state()

    input_gradient_agreement(student, teacher, images, projections=2)  # draws from its own generator
    maps = gradient_maps(student, images, predicted_classes(teacher, images))

    assert torch.equal(torch.get_rng_state(), rng)
    for model, state in zip((teacher, student), states):
        assert all(torch.equal(value, state[key]) for key, value in model.state_dict().items())
        assert all(p.grad is None for p in model.parameters())
    assert [[m.training for m in model.modules()] for model in (teacher, student)] == modes
    assert maps.shape == (6, 8, 8) and float(maps.amin()) >= 0
    assert torch.allclose(maps.flatten(1).amax(1), torch.ones(6))


def test_float32_models_are_measured_in_float32_without_autocast():
    teacher = batchnorm_cnn(0).float()
    student = tiny_vit(1).float()
    images = torch.randn(4, 1, 8, 8, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = input_gradient_agreement(student, teacher, images)
    outside = input_gradient_agreement(student.double(), teacher.double(), images)
    assert inside["agreement_cosine"] == pytest.approx(outside["agreement_cosine"], abs=1e-5)  # no bf16 rounding


def test_bad_arguments_are_named():
    model = batchnorm_cnn(0)
    with pytest.raises(ValueError, match="non-empty batch"):
        input_gradient_agreement(model, model, torch.zeros(0, 1, 8, 8))
    with pytest.raises(ValueError, match="classes must be"):
        gradient_maps(model, torch.zeros(2, 1, 8, 8, dtype=torch.float64), torch.zeros(3, dtype=torch.long))


def test_gradient_map_figure_is_a_png_of_the_stated_size(tmp_path):
    teacher, student = batchnorm_cnn(0), batchnorm_cnn(1)
    images = torch.randn(8, 1, 8, 8, dtype=torch.float64)
    classes = predicted_classes(teacher, images)
    before = gradient_maps(student, images, classes)
    after = gradient_maps(teacher, images, classes)
    path = gradient_map_figure(
        images, gradient_maps(teacher, images, classes), before, after, tmp_path / "maps" / "gradient_maps.png",
        mean=(0.5,), std=(0.25,),
    )
    with Image.open(path) as picture:
        assert picture.format == "PNG" and picture.size == (1050, 580)
        picture.load()
    assert [p.name for p in path.parent.iterdir()] == ["gradient_maps.png"]  # no temporary file left
    with pytest.raises(ValueError, match="teacher_maps must be"):
        gradient_map_figure(images, before[:3], before, after, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()


def test_the_teacher_reference_gives_the_same_agreement_and_maps_as_the_teacher_itself():
    from jacplug.agreement import (agreement_with, gradient_maps, input_gradient_agreement, predicted_classes,
                                   reference_maps, teacher_reference)

    torch.manual_seed(0)
    teacher = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Tanh(), torch.nn.Flatten(),
                                  torch.nn.Linear(64, 5)).double()
    student = torch.nn.Sequential(torch.nn.Conv2d(3, 2, 3), torch.nn.Softplus(), torch.nn.Flatten(),
                                  torch.nn.Linear(32, 5)).double()
    images = torch.randn(10, 3, 6, 6, dtype=torch.float64)
    reference = teacher_reference(teacher, images, batch_size=4, projections=2)
    assert agreement_with(student, reference) == input_gradient_agreement(student, teacher, images, batch_size=4,
                                                                          projections=2)
    classes, maps = reference_maps(reference, 6)
    assert torch.equal(classes, predicted_classes(teacher, images[:6]))
    torch.testing.assert_close(maps, gradient_maps(teacher, images[:6], classes), rtol=1e-6, atol=1e-7)
