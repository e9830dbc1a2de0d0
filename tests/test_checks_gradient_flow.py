"""gradient_flow catches the usual broken hand-written Jacobian losses, passes the correct one, names
every detached term."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import jacplug
from jacplug.errors import DetachedLossError, UserError
from jacplug.features import FeatureTap
from jacplug.checks.gradient_flow import SuspiciousGradientWarning, flow_report, format_flow_table, gradient_flow

B, D, C = 4, 5, 3


@pytest.fixture
def setup():
    torch.manual_seed(0)
    student = nn.Sequential(nn.Linear(D, 8), nn.Tanh(), nn.Linear(8, C))
    teacher = nn.Sequential(nn.Linear(D, 16), nn.Tanh(), nn.Linear(16, C)).requires_grad_(False)
    x = torch.randn(B, D, requires_grad=True)
    return student, teacher, x


def handwritten_jacobian_retain_graph(output, x):
    """A common second attempt: autograd.grad with retain_graph=True only."""
    jac = torch.zeros(B, C, D)
    for i in range(C):
        grad_output = torch.zeros(B, C)
        grad_output[:, i] = 1
        jac[:, i, :] = torch.autograd.grad(output, x, grad_output, retain_graph=True)[0]
    return jac


def handwritten_jacobian_backward(output, x, create_graph):
    """A common first attempt: output.backward(..., create_graph=...) and read x.grad."""
    jac = torch.zeros(B, C, D)
    for i in range(C):
        grad_output = torch.zeros(B, C)
        grad_output[:, i] = 1
        output.backward(grad_output, create_graph=create_graph, retain_graph=True)
        jac[:, i, :] = x.grad
        x.grad = None
    return jac


def eq10(s_jac, t_jac):
    n = lambda j: j / j.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # noqa: E731
    return (n(s_jac) - n(t_jac)).norm(dim=-1).mean()


def terms_for(student, teacher, x, s_jac):
    s, t = student(x), teacher(x)
    t_jac = handwritten_jacobian_retain_graph(t, x)  # the teacher's needs no graph: this one is fine
    kd = F.kl_div(F.log_softmax(s, 1), F.log_softmax(t, 1), log_target=True, reduction="batchmean")
    return {"kd": kd, "jacobian": eq10(s_jac, t_jac)}


def test_retain_graph_only_jacobian_is_caught(setup):
    student, teacher, x = setup
    s_jac = handwritten_jacobian_retain_graph(student(x), x)
    assert not s_jac.requires_grad
    terms = terms_for(student, teacher, x, s_jac)
    with pytest.raises(DetachedLossError, match=r"jacobian: it has no graph.*create_graph=True") as info:
        gradient_flow(terms, student)
    assert info.value.detached == ["jacobian"]


def test_requires_grad_true_on_computed_jacobian_is_caught(setup):
    student, teacher, x = setup
    s_jac = handwritten_jacobian_retain_graph(student(x), x)
    s_jac.requires_grad = True  # the usual "fix": a new leaf, no path to the student
    s_jac.retain_grad()
    terms = terms_for(student, teacher, x, s_jac)
    assert terms["jacobian"].requires_grad  # looks trainable ...
    with pytest.raises(DetachedLossError, match="does not reach the parameters") as info:
        gradient_flow(terms, student.parameters())
    assert info.value.detached == ["jacobian"]  # ... but is not; kd is fine


@pytest.mark.parametrize("how", ["jacplug", "backward-create-graph", "grad-create-graph"])
def test_correct_variants_pass(setup, how):
    student, teacher, x = setup
    s = student(x)
    if how == "jacplug":
        s_jac = jacplug.jacobian(s, x)
    elif how == "backward-create-graph":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # the reference-cycle warning; see docs
            s_jac = handwritten_jacobian_backward(s, x, create_graph=True)
        student.zero_grad(set_to_none=True)  # backward() also accumulated into the parameters
    else:
        rows = [torch.autograd.grad(s[:, i].sum(), x, create_graph=True)[0] for i in range(C)]
        s_jac = torch.stack(rows, 1)
    norms = gradient_flow(terms_for(student, teacher, x, s_jac), dict(student.named_parameters()))
    assert set(norms) == {"kd", "jacobian"} and all(v > 0 for v in norms.values())
    assert all(p.grad is None for p in student.parameters())  # the check leaves .grad alone


def test_every_detached_term_is_named_and_graph_survives(setup):
    student, teacher, x = setup
    s = student(x)
    terms = {
        "kd": F.mse_loss(s.softmax(1), teacher(x).softmax(1)),
        "no_grad": s.detach().pow(2).mean(),
        "teacher_only": teacher(x).pow(2).mean(),
        "input_only": x.pow(2).mean(),
        "leaf": torch.tensor(1.0, requires_grad=True),
    }
    with pytest.raises(DetachedLossError, match="leaf: it is a leaf") as info:
        gradient_flow(terms, student)
    assert info.value.detached == ["no_grad", "teacher_only", "input_only", "leaf"]
    for name in info.value.detached:
        assert name in str(info.value)
    terms["kd"].backward()  # the caller's graph was retained
    assert student[0].weight.grad is not None


def test_feature_loss_through_tap_flows_and_detached_feature_does_not(setup):
    student, teacher, x = setup
    with FeatureTap(student, ["1"]) as tap:
        student(x)
    with torch.no_grad(), FeatureTap(teacher, ["1"], requires_grad=False) as teacher_tap:
        teacher(x)
    target = teacher_tap["1"][:, :8]
    terms = {"fitnet": F.mse_loss(tap["1"], target), "fitnet_detached": F.mse_loss(tap["1"].detach(), target)}
    report = {r.name: r for r in flow_report(terms, student)}
    assert report["fitnet"].status == "ok" and report["fitnet"].reached == 2  # the first Linear only
    assert report["fitnet_detached"].status == "detached"


def test_zero_and_nonfinite_gradients_warn_but_do_not_raise(setup):
    student, _, x = setup
    s = student(x)
    terms = {"zero": (s - s).pow(2).mean(), "nan": s.sum() * torch.tensor(float("nan"))}
    with pytest.warns(SuspiciousGradientWarning, match="zero.*nan"):
        norms = gradient_flow(terms, student)
    assert norms["zero"] == 0.0


def test_argument_errors(setup):
    student, teacher, x = setup
    s = student(x)
    with pytest.raises(UserError, match="scalar"):
        gradient_flow({"per_sample": s.sum(1)}, student)
    with pytest.raises(UserError, match="frozen teacher"):
        gradient_flow({"kd": s.sum()}, teacher)
    loss = s.sum()
    loss.backward()
    with pytest.raises(UserError, match="before backward"):
        gradient_flow({"kd": loss}, student)


def test_format_flow_table(setup):
    student, teacher, x = setup
    s = student(x)
    report = flow_report({"kd": s.pow(2).mean(), "jacobian": s.detach().sum()}, student)
    table = format_flow_table(report, weights={"kd": 1.0, "jacobian": 0.5})
    lines = table.splitlines()
    assert lines[0].split() == ["term", "weight", "value", "grad", "norm", "weighted", "norm", "params", "reached", "status"]
    assert lines[2].startswith("kd") and "4/4" in lines[2] and lines[2].endswith("ok")
    assert lines[3].startswith("jacobian") and "detached: it has no graph" in lines[3]
    assert "weight" not in format_flow_table(report)
