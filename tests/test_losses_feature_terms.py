"""Feature terms against hand computations on tiny float64 convnets (features read directly, no taps)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from jacplug.errors import UserError
from jacplug.losses import (
    AttentionTransferLoss,
    DistillBatch,
    FeatureJacobianLoss,
    FitNetLoss,
    JacobianLoss,
    WeightedLoss,
    options_from_pair,
)
from jacplug.losses.feature_terms import layer_map
from jacplug.losses.teacher_rows import CACHE_GRAPH_USED
from jacplug.registry import ModelPair

B, C = 3, 4


class Tiny(nn.Module):
    """``body``: conv + tanh, the tapped feature map ``[B, ch, H, W]``; ``head``: logits."""

    def __init__(self, channels: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(2, channels, 3, stride=stride, padding=1), nn.Tanh())
        side = 6 // stride
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(channels * side * side, C))


@pytest.fixture
def nets():
    torch.manual_seed(4)
    student, teacher = Tiny(3, 1).double(), Tiny(5, 2).double().requires_grad_(False)
    return student, teacher, torch.randn(B, 2, 6, 6, dtype=torch.float64)


def make_batch(student, teacher, x) -> DistillBatch:
    """Inputs require grad; both networks run with grad enabled (teacher frozen), as the pipeline does."""
    inputs = x.clone().requires_grad_(True)
    f_s, f_t = student.body(inputs), teacher.body(inputs)
    return DistillBatch(
        inputs=inputs,
        student_logits=student.head(f_s),
        teacher_logits=teacher.head(f_t),
        student_features={"s": f_s},
        teacher_features={"t": f_t},
    )


def pool_6_to_3(m: torch.Tensor) -> torch.Tensor:
    """Adaptive average pooling 6x6 -> 3x3 written out: the mean of each 2x2 block."""
    return m.reshape(*m.shape[:-2], 3, 2, 3, 2).mean((-3, -1))


def attention_reference(f: torch.Tensor, pool: bool, normalize: bool = True) -> torch.Tensor:
    a = (f**2).mean(1)
    a = (pool_6_to_3(a) if pool else a).flatten(1)
    return a / a.norm(dim=1, keepdim=True) if normalize else a


def weights_trained(model: nn.Module) -> bool:
    return all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_fitnet_matches_hand_computation_and_trains_adapter(nets):
    student, teacher, x = nets
    term = FitNetLoss(layers={"s": "t"}, channels={"s": (5, 3)}).double()
    batch = make_batch(student, teacher, x)
    value = term(batch)
    weight = term.adapters[0].weight[:, :, 0, 0]  # [teacher_ch, student_ch]
    adapted = pool_6_to_3(torch.einsum("ts,bshw->bthw", weight, batch.student_features["s"]))
    assert torch.allclose(value, ((adapted - batch.teacher_features["t"]) ** 2).mean(), atol=1e-12)

    loss = WeightedLoss({"fitnet": (term, 1.0)})
    assert {id(p) for p in term.adapters.parameters()} <= {id(p) for p in loss.parameters()}
    assert loss.feature_layers == {"s": "t"}
    loss(make_batch(student, teacher, x))[0].backward()
    assert weights_trained(term) and weights_trained(student.body)
    assert all(p.grad is None for p in teacher.parameters())


def test_fitnet_accepts_vector_features():
    torch.manual_seed(0)
    term = FitNetLoss(layers="pool", channels={"pool": (4, 2)}).double()
    f_s, f_t = torch.randn(B, 2, dtype=torch.float64), torch.randn(B, 4, dtype=torch.float64)
    batch = DistillBatch(inputs=f_s, student_logits=f_s, student_features={"pool": f_s}, teacher_features={"pool": f_t})
    expected = ((f_s @ term.adapters[0].weight[:, :, 0, 0].T - f_t) ** 2).mean()
    assert torch.allclose(term(batch), expected, atol=1e-12)


def test_fitnet_refuses_wrong_channels_and_missing_features(nets):
    student, teacher, x = nets
    with pytest.raises(UserError, match="no entry for student layer\\(s\\) \\['s'\\]"):
        FitNetLoss(layers={"s": "t"}, channels={"t": (5, 3)})
    term = FitNetLoss(layers={"s": "t"}, channels={"s": (5, 4)}).double()
    with pytest.raises(ValueError, match="fix channels\\['s'\\] = \\(5, 3\\)"):
        term(make_batch(student, teacher, x))
    wrong_layer = FitNetLoss(layers={"s": "layer9"}, channels={"s": (5, 3)}).double()
    with pytest.raises(ValueError, match="teacher feature map 'layer9', but the batch has \\['t'\\]"):
        wrong_layer(make_batch(student, teacher, x))


def test_layer_specs_and_model_pairs():
    assert layer_map("x", "layer3") == {"layer3": "layer3"}
    assert layer_map("x", "a>b+layer4") == {"a": "b", "layer4": "layer4"}
    assert layer_map("x", ["l1", "l2"]) == {"l1": "l1", "l2": "l2"}
    with pytest.raises(UserError, match="names no layer pair"):
        layer_map("x", "a>")
    channels = {"t3": (8, 4), "t4": (16, 8)}
    pair = ModelPair(teacher="big", student="small", layers={"t3": "s3", "t4": "s4"}, channels=channels)
    assert options_from_pair(pair, ["t4"]) == {"layers": {"s4": "t4"}, "channels": {"s4": (16, 8)}}
    assert FitNetLoss(**options_from_pair(pair)).adapters[1].in_channels == 8
    with pytest.raises(UserError, match="no teacher layers \\['t9'\\]"):
        options_from_pair(pair, ["t9"])


def test_attention_transfer_matches_hand_computation(nets):
    student, teacher, x = nets
    batch = make_batch(student, teacher, x)
    value = AttentionTransferLoss(layers={"s": "t"})(batch)
    a_s = attention_reference(batch.student_features["s"], pool=True)
    a_t = attention_reference(batch.teacher_features["t"], pool=False)
    assert torch.allclose(value, ((a_s - a_t) ** 2).sum(1).mean(), atol=1e-12)
    value.backward()
    assert weights_trained(student.body)
    assert all(p.grad is None for p in teacher.parameters())


def test_attention_refuses_vectors_and_bad_p():
    f = torch.randn(B, 4, dtype=torch.float64)
    batch = DistillBatch(inputs=f, student_logits=f, student_features={"a": f}, teacher_features={"a": f})
    with pytest.raises(ValueError, match="expected \\[B, C, H, W\\]"):
        AttentionTransferLoss(layers="a")(batch)
    with pytest.raises(UserError, match="p must be a finite number > 0"):
        AttentionTransferLoss(layers="a", p=0)
    with pytest.raises(UserError, match="summary='mean' is not one of"):
        FeatureJacobianLoss(layers="a", summary="mean")


def per_sample_map_jacobian(body: nn.Module, x: torch.Tensor, pool: bool, normalize: bool) -> torch.Tensor:
    """``[B, HW, 2, 6, 6]``: per-sample Jacobian of the attention map, from the full Jacobian."""
    full = torch.autograd.functional.jacobian(lambda z: attention_reference(body(z), pool, normalize), x)
    return torch.stack([full[b, :, b] for b in range(x.shape[0])])


@pytest.mark.parametrize("summary", ["projection", "energy"])
def test_feature_jacobian_matches_hand_computation(nets, summary):
    student, teacher, x = nets
    normalize = summary == "projection"
    torch.manual_seed(8)
    value = FeatureJacobianLoss(layers={"s": "t"}, summary=summary)(make_batch(student, teacher, x))
    torch.manual_seed(8)
    r = torch.randn(B, 9, dtype=torch.float64) if normalize else torch.ones(B, 9, dtype=torch.float64)
    g_s = torch.einsum("bh,bhn->bn", r, per_sample_map_jacobian(student.body, x, True, normalize).flatten(2))
    g_t = torch.einsum("bh,bhn->bn", r, per_sample_map_jacobian(teacher.body, x, False, normalize).flatten(2))
    g_s, g_t = g_s / g_s.norm(dim=1, keepdim=True), g_t / g_t.norm(dim=1, keepdim=True)
    assert torch.allclose(value, ((g_s - g_t) ** 2).sum(1).mean(), atol=1e-10)
    value.backward()
    assert all(p.grad.abs().sum() > 0 for p in student.body.parameters())


def test_feature_jacobian_keeps_the_teacher_graph_for_later_jacobian_terms(nets):
    student, teacher, x = nets
    feature_jac, jac = FeatureJacobianLoss(layers={"s": "t"}), JacobianLoss()
    total, values = WeightedLoss({"feature-jacobian": (feature_jac, 1.0), "jacobian": (jac, 1.0)})(
        make_batch(student, teacher, x)
    )
    total.backward()
    assert set(values) == {"feature-jacobian", "jacobian"} and weights_trained(student.body)
    with pytest.raises(ValueError, match="list 'feature-jacobian' before the Jacobian terms"):
        WeightedLoss({"jacobian": (jac, 1.0), "feature-jacobian": (feature_jac, 1.0)})(make_batch(student, teacher, x))
    batch = make_batch(student, teacher, x)
    batch.teacher_features = {"t": batch.teacher_features["t"].detach()}
    with pytest.raises(ValueError, match="teacher feature map 't' has no graph to the inputs"):
        feature_jac(batch)
    assert CACHE_GRAPH_USED not in batch.cache
