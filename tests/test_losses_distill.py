"""Distillation terms, the default preset, the spec parser and the built-in loss plugin."""

from __future__ import annotations

import math
import re

import pytest
import torch
from torch import nn

import jacplug_plugins.losses as loss_plugin
from jacplug.errors import UnknownNameError, UserError
from jacplug.losses import (
    TERMS,
    CrossEntropyLoss,
    DistillBatch,
    KDLoss,
    SoftMSELoss,
    TeacherCELoss,
    build_loss,
    jacobian_distillation,
    parse_spec,
)
from jacplug.losses.presets import SPEC_FORM
from jacplug.registry import PluginHost, create_loss, reset_host

B, C = 5, 4


def _softmax(z: torch.Tensor) -> torch.Tensor:
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


@pytest.fixture
def logits():
    g = torch.Generator().manual_seed(7)
    student = torch.randn(B, C, dtype=torch.float64, generator=g) * 2
    teacher = torch.randn(B, C, dtype=torch.float64, generator=g) * 3
    targets = torch.tensor([0, 3, 1, 2, 3])
    return student, teacher, targets


@pytest.fixture
def loss_host():
    """A private plugin host with only the built-in loss plugin, so specs resolve hermetically."""
    host = PluginHost(load_entry_points=False)
    host.register(loss_plugin, name="jacplug.losses")
    previous = reset_host(host)
    yield host
    reset_host(previous)


def test_kd_matches_hand_computation(logits):
    s, t, _ = logits
    T = 3.0
    p_t, p_s = _softmax(t / T), _softmax(s / T)
    expected = T * T * (p_t * (p_t.log() - p_s.log())).sum(1).mean()
    value = KDLoss(temperature=T)(DistillBatch(inputs=s, student_logits=s, teacher_logits=t))
    assert torch.allclose(value, expected, atol=1e-12)


def test_mse_soft_matches_hand_computation(logits):
    s, t, _ = logits
    expected = ((_softmax(s / 2) - _softmax(t / 2)) ** 2).sum() / (B * C)
    value = SoftMSELoss(temperature=2)(DistillBatch(inputs=s, student_logits=s, teacher_logits=t))
    assert torch.allclose(value, expected, atol=1e-14)


def test_ce_and_ce_teacher_match_hand_computation(logits):
    s, t, y = logits
    expected = -torch.stack([_softmax(s)[b, y[b]].log() for b in range(B)]).mean()
    value = CrossEntropyLoss()(DistillBatch(inputs=s, student_logits=s, targets=y))
    assert torch.allclose(value, expected, atol=1e-12)
    pseudo = [int(t[b].argmax()) for b in range(B)]
    expected = -torch.stack([_softmax(s / 2)[b, pseudo[b]].log() for b in range(B)]).mean()
    value = TeacherCELoss(temperature=2)(DistillBatch(inputs=s, student_logits=s, teacher_logits=t))
    assert torch.allclose(value, expected, atol=1e-12)


@pytest.mark.parametrize("term", [KDLoss(), SoftMSELoss(), TeacherCELoss()], ids=lambda t: t.name)
def test_distill_trains_student_never_teacher(term):
    torch.manual_seed(0)
    student, teacher = nn.Linear(3, C).double(), nn.Linear(3, C).double()
    x = torch.randn(B, 3, dtype=torch.float64)
    term(DistillBatch(inputs=x, student_logits=student(x), teacher_logits=teacher(x))).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in student.parameters())
    assert all(p.grad is None for p in teacher.parameters())  # the teacher's logits are read detached


def test_missing_batch_fields_are_named(logits):
    s, _, _ = logits
    with pytest.raises(ValueError, match="needs teacher_logits"):
        KDLoss()(DistillBatch(inputs=s, student_logits=s))
    with pytest.raises(ValueError, match="needs targets"):
        CrossEntropyLoss()(DistillBatch(inputs=s, student_logits=s))


@pytest.mark.parametrize("bad", [0, -1.0, "hot", float("inf"), True])
def test_bad_temperature_is_a_user_error(bad):
    with pytest.raises(UserError, match=f"temperature must be a finite number > 0, got {re.escape(repr(bad))}"):
        KDLoss(temperature=bad)


@pytest.mark.parametrize("bad", [1.0, -0.1, float("nan"), "some", True])
def test_bad_label_smoothing_is_a_user_error(bad):
    with pytest.raises(UserError, match=r"loss term 'ce': label_smoothing must be in \[0, 1\)"):
        CrossEntropyLoss(label_smoothing=bad)


def test_edge_values_of_temperature_and_label_smoothing_are_accepted():
    assert KDLoss(temperature=0.5).temperature == 0.5
    assert CrossEntropyLoss(label_smoothing=0.0).label_smoothing == 0.0
    assert CrossEntropyLoss(label_smoothing=0.99).label_smoothing == 0.99


def test_default_preset_weights_and_value(logits):
    s, t, _ = logits
    loss = jacobian_distillation()
    assert loss.weights == {"kd": 0.5, "jacobian": pytest.approx(0.15)}  # ratio 0.3, chosen on validation
    assert loss.terms["jacobian"].squared and loss.terms["jacobian"].classes == "top1"
    assert loss.terms["kd"].temperature == 4.0
    mix = jacobian_distillation(alpha=0.25, jacobian_scale=3, distill="mse-soft", temperature=2, classes="label")
    assert mix.weights == {"mse-soft": 0.75, "jacobian": 0.75}
    assert mix.needs >= {"targets", "input_grad"}
    with pytest.raises(UserError, match="alpha must be in"):
        jacobian_distillation(alpha=1)
    with pytest.raises(UserError, match="distill='ce' is not one of"):
        jacobian_distillation(distill="ce")


def test_parse_spec_values():
    name, weight, options = parse_spec("jacobian=10:squared=false,classes=label,k=2,eps=1e-6,backend=None")
    assert (name, weight) == ("jacobian", 10.0)
    assert options == {"squared": False, "classes": "label", "k": 2, "eps": 1e-6, "backend": None}
    assert type(options["k"]) is int and type(options["eps"]) is float
    assert parse_spec(" kd = 0.5 ") == ("kd", 0.5, {})


@pytest.mark.parametrize(
    "spec, message",
    [
        ("kd", "a term needs a name and a weight"),
        ("=1", "a term needs a name and a weight"),
        ("kd=", "a term needs a name and a weight"),
        ("kd:temperature=4", "the term 'kd' has no weight before its options"),
        ("kd=much", "the weight 'much' is not a number"),
        ("kd=0", "the weight must be finite and > 0"),
        ("kd=-2", "the weight must be finite and > 0"),
        ("kd=nan", "the weight must be finite and > 0"),
        ("jacobian=1:squared", "'squared' is not KEY=VALUE"),
        ("jacobian=1:k=2,k=3", "'k' is given twice"),
    ],
)
def test_bad_specs_say_the_right_form(spec, message):
    with pytest.raises(UserError) as info:
        parse_spec(spec)
    text = str(info.value)  # names the flag and what the user typed, then the problem and the right form
    assert text.startswith(f"--loss {spec!r}: ") and message in text and text.endswith(f"expected {SPEC_FORM}")
    assert "\n" not in text


def test_build_loss_through_the_registry(loss_host, logits):
    s, t, _ = logits
    loss = build_loss(["kd=1:temperature=2", "ce-teacher=0.5"])
    assert loss.weights == {"kd": 1.0, "ce-teacher": 0.5}
    assert loss.terms["kd"].temperature == 2.0
    total, values = loss(DistillBatch(inputs=s, student_logits=s, teacher_logits=t))
    assert math.isclose(float(total), values["kd"] + 0.5 * values["ce-teacher"], rel_tol=1e-12)
    fitnet = build_loss(["fitnet=1:layers=s3>t3"], overrides={"fitnet": {"channels": {"s3": (4, 2)}}})
    assert fitnet.feature_layers == {"s3": "t3"}


def test_build_loss_refuses_clearly(loss_host):
    with pytest.raises(UnknownNameError, match="did you mean 'jacobian'"):
        build_loss(["jacobain=1"])
    with pytest.raises(UserError, match="bad options for loss term 'jacobian'.*accepts: classes, k, squared"):
        build_loss(["jacobian=1:classs=label"])
    with pytest.raises(UserError, match="bad options for loss term 'fitnet'.*missing"):
        build_loss(["fitnet=1"])
    with pytest.raises(UserError, match="classes='lable' is not one of"):
        build_loss(["jacobian=1:classes=lable"])
    with pytest.raises(UserError, match="given twice"):
        build_loss(["kd=1", "kd=2"])


def test_the_spec_form_in_error_messages_shows_working_examples(loss_host):
    examples = SPEC_FORM.partition("(e.g. ")[2].rstrip(")").split(" or ")
    assert len(examples) == 2
    assert set(build_loss(examples).weights) == {parse_spec(e)[0] for e in examples}


def test_plugin_registers_every_term(loss_host):
    registry = loss_host.registry("losses")
    assert registry.names() == sorted(TERMS)
    assert all(registry.get(name).description for name in TERMS)
    term = create_loss("kd", temperature=2)
    assert isinstance(term, KDLoss) and term.temperature == 2
