"""The teacher cache gives the Distiller the same terms and gradients as the live teacher; the Jacobian term under
bf16 autocast stays float32 and close."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jacplug.errors import UserError
from jacplug.losses import JacobianLoss, KDLoss, WeightedLoss, jacobian_distillation
from jacplug.training import teacher_cache
from jacplug.training.runtime import Runtime
from jacplug.distiller import Distiller

CPU = Runtime(device=torch.device("cpu"))


def convnet(classes: int = 4) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, stride=2, padding=1),
        nn.Tanh(), nn.Flatten(), nn.Linear(4 * 4 * 4, classes),
    )


class Images(torch.utils.data.Dataset):
    def __init__(self, n: int = 12) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i):
        return self.x[i], int(self.y[i])


@pytest.mark.parametrize("classes", ["top1", "label", "all"])
def test_cached_teacher_gives_the_same_terms_and_gradients(tmp_path, classes):
    torch.manual_seed(0)
    student, teacher = convnet(), convnet().eval().requires_grad_(False)
    loss = WeightedLoss({"kd": (KDLoss(), 1.0), "jacobian": (JacobianLoss(classes=classes), 10.0)})
    data = Images()
    path = tmp_path / "cache.safetensors"
    teacher_cache.build_cache(path, teacher, loss, data, CPU, batch_size=5, key="k", show=False)
    assert teacher_cache.TeacherCache.matches(path, "k") and not teacher_cache.TeacherCache.matches(path, "other")
    cache = teacher_cache.TeacherCache(path, CPU.device)

    index = torch.tensor([7, 2, 11, 0])
    x, y = data.x[index], data.y[index]
    results = []
    for cached in (None, cache.lookup(index)):
        student.zero_grad()
        out = Distiller(student, teacher, loss)(x, y, cached=cached)
        out["loss"].backward()
        results.append(({k: float(out[k].detach()) for k in loss.terms}, [p.grad.clone() for p in student.parameters()]))
    (live, live_grads), (hit, hit_grads) = results
    assert live == pytest.approx(hit, rel=1e-5)
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(live_grads, hit_grads))


def test_cache_refuses_augmented_data_and_feature_terms():
    with pytest.raises(UserError, match="un-augmented"):
        teacher_cache.check_cacheable(jacobian_distillation(), augment=True, dataset="cifar10")
    from jacplug.losses import AttentionTransferLoss

    features = WeightedLoss({"attention": (AttentionTransferLoss(layers="0"), 1.0)})
    with pytest.raises(UserError, match="feature maps"):
        teacher_cache.check_cacheable(features, augment=False, dataset="digits")


def test_jacobian_term_under_bf16_autocast_stays_float32_and_close():
    """On CPU bf16 autocast is off by default (slower); forcing it checks the term's precision handling:
    the logits are float32, the term's value and gradients stay close to the float32 computation."""
    torch.manual_seed(0)
    student, teacher = convnet(), convnet().eval().requires_grad_(False)
    loss = jacobian_distillation()
    x, y = torch.randn(6, 1, 8, 8), torch.randint(0, 4, (6,))
    out = {}
    for name, amp in (("fp32", False), ("bf16", torch.bfloat16)):
        student.zero_grad()
        values = Distiller(student, teacher, loss, amp=amp)(x, y)
        assert all(v.dtype == torch.float32 for v in values.values())
        values["loss"].backward()
        grad = torch.cat([p.grad.flatten() for p in student.parameters()])
        assert torch.isfinite(grad).all()
        out[name] = (values["jacobian"].item(), grad)
    assert out["bf16"][0] == pytest.approx(out["fp32"][0], rel=0.05, abs=0.02)
    cosine = torch.nn.functional.cosine_similarity(out["bf16"][1], out["fp32"][1], dim=0)
    assert cosine > 0.95


def test_cache_key_follows_the_data_content_the_precision_and_the_version(monkeypatch):
    torch.manual_seed(0)
    teacher = convnet().eval().requires_grad_(False)
    key = teacher_cache.cache_key(teacher, Images(), ["kd=1"], CPU)
    assert key == teacher_cache.cache_key(teacher, Images(), ["kd=1"], CPU)
    edited = Images()
    edited.x[3, 0, 2, 2] += 0.5  # same number of samples, one pixel changed
    assert teacher_cache.cache_key(teacher, edited, ["kd=1"], CPU) != key
    bf16 = Runtime(device=torch.device("cpu"), amp_dtype=torch.bfloat16)
    assert teacher_cache.cache_key(teacher, Images(), ["kd=1"], bf16) != key
    assert teacher_cache.cache_key(teacher, Images(), ["kd=2"], CPU) != key
    monkeypatch.setattr(teacher_cache, "__version__", "0.0.0+other")
    assert teacher_cache.cache_key(teacher, Images(), ["kd=1"], CPU) != key


def test_cache_is_built_in_the_precision_the_live_teacher_runs_in(tmp_path):
    torch.manual_seed(0)
    teacher = convnet().eval().requires_grad_(False)
    data = Images()
    bf16 = Runtime(device=torch.device("cpu"), amp_dtype=torch.bfloat16)
    loss = WeightedLoss({"kd": (KDLoss(), 1.0), "jacobian": (JacobianLoss(), 1.0)})
    path = tmp_path / "cache.safetensors"
    teacher_cache.build_cache(path, teacher, loss, data, bf16, batch_size=len(data), key="k", show=False)
    cached = teacher_cache.TeacherCache(path, CPU.device).lookup(torch.arange(len(data)))
    with bf16.autocast():
        live = teacher(data.x).float()
    assert torch.equal(cached["teacher_logits"], live)
    assert not torch.allclose(cached["teacher_logits"], teacher(data.x), atol=1e-3)  # float32 differs
