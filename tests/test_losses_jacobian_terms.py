"""Jacobian terms against independent computations: full per-sample Jacobians from
``torch.autograd.functional.jacobian`` and the formulas written out by hand (float64)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import per_sample_reference, small_convnet, small_mlp
from jacplug.errors import UserError
from jacplug.losses import (
    DirectionalJacobianLoss,
    DistillBatch,
    JacobianLoss,
    NoisyDistillLoss,
    ProjectedJacobianLoss,
)
from jacplug.losses.teacher_rows import CACHE_GRAPH_USED, CACHE_JACOBIAN_ROWS, CACHE_ROWS

B, D, C = 4, 6, 4


@pytest.fixture
def nets():
    torch.manual_seed(3)
    student, teacher = small_mlp(D, C).double(), small_mlp(D, C).double()
    teacher.requires_grad_(False)
    x = torch.randn(B, D, dtype=torch.float64)
    return student, teacher, x


def make_batch(student, teacher, x, targets=None, with_fns=False, teacher_graph=True) -> DistillBatch:
    """The caller contract: inputs require grad, both forwards with grad enabled."""
    inputs = x.clone().requires_grad_(True)
    teacher_logits = teacher(inputs) if teacher_graph else teacher(x).detach()
    return DistillBatch(
        inputs=inputs,
        student_logits=student(inputs),
        teacher_logits=teacher_logits,
        targets=targets,
        student_fn=student if with_fns else None,
        teacher_fn=teacher if with_fns else None,
    )


def weights_trained(model: nn.Module) -> bool:
    """Every weight matrix got a non-zero gradient (biases of the last layer do not enter J)."""
    return all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.dim() > 1)


def unit(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm()


def eq10_reference(student, teacher, x, rows, squared=True) -> torch.Tensor:
    """mean over b and selected classes i of ||n(J_T[b, i]) - n(J_S[b, i])|| (squared)."""
    j_s, j_t = per_sample_reference(student, x), per_sample_reference(teacher, x)
    terms = []
    for b in range(x.shape[0]):
        for i in rows[b]:
            d = (unit(j_t[b, i].flatten()) - unit(j_s[b, i].flatten())).norm()
            terms.append(d**2 if squared else d)
    return torch.stack(terms).mean()


@pytest.mark.parametrize("squared", [True, False])
@pytest.mark.parametrize("classes", ["top1", "label", "topk", "all"])
def test_eq10_matches_reference(nets, classes, squared):
    student, teacher, x = nets
    targets = torch.tensor([2, 0, 3, 1])
    t = teacher(x)
    rows = {
        "top1": t.argmax(1, keepdim=True),
        "label": targets[:, None],
        "topk": t.topk(2, dim=1).indices,
        "all": torch.arange(C).expand(B, C),
    }[classes]
    term = JacobianLoss(classes=classes, k=2 if classes == "topk" else 1, squared=squared)
    value = term(make_batch(student, teacher, x, targets))
    assert torch.allclose(value, eq10_reference(student, teacher, x, rows, squared), atol=1e-10)
    assert ("targets" in term.needs) == (classes == "label")


def test_eq10_on_convnets_with_batchnorm_and_inplace_relu(convnet):
    """Image inputs [B, 2, 5, 5]: rows are normalised over the flattened input."""
    torch.manual_seed(1)
    student = small_convnet().double().eval()
    x = torch.randn(3, 2, 5, 5, dtype=torch.float64)
    value = JacobianLoss(classes="topk", k=2)(make_batch(student, convnet.requires_grad_(False), x))
    rows = convnet(x).topk(2, dim=1).indices
    assert torch.allclose(value, eq10_reference(student, convnet, x, rows), atol=1e-10)
    value.backward()
    assert weights_trained(student)


def test_eq10_gradient_matches_double_backprop_reference(nets):
    """Parameter gradients equal those of the loss hand-written with autograd.grad."""
    student, teacher, x = nets
    JacobianLoss()(make_batch(student, teacher, x)).backward()
    assert weights_trained(student)
    ours = [p.grad for p in student.parameters()]
    student.zero_grad(set_to_none=True)
    inputs = x.clone().requires_grad_(True)
    s, t = student(inputs), teacher(inputs)
    i = t.argmax(1)
    (g_s,) = torch.autograd.grad(s.gather(1, i[:, None]).sum(), inputs, create_graph=True)
    (g_t,) = torch.autograd.grad(t.gather(1, i[:, None]).sum(), inputs)
    g_s, g_t = g_s / g_s.norm(dim=1, keepdim=True), g_t / g_t.norm(dim=1, keepdim=True)
    ((g_s - g_t) ** 2).sum(1).mean().backward()
    for mine, reference in zip(ours, (p.grad for p in student.parameters())):
        assert (mine is None and reference is None) or torch.allclose(mine, reference, atol=1e-10)
    assert all(p.grad is None for p in teacher.parameters())


def test_teacher_rows_are_cached_and_reused(nets):
    student, teacher, x = nets
    batch = make_batch(student, teacher, x)
    first = JacobianLoss()(batch)
    assert batch.cache[CACHE_GRAPH_USED] is True
    assert batch.cache[CACHE_ROWS].shape == (B, 1) and batch.cache[CACHE_JACOBIAN_ROWS].shape == (B, 1, D)
    assert batch.cache[CACHE_JACOBIAN_ROWS].grad_fn is None
    # the teacher graph is spent: a second term with the same rows must use the cache
    top1 = teacher(x).argmax(1, keepdim=True)
    assert torch.allclose(first, eq10_reference(student, teacher, x, top1), atol=1e-10)
    second = JacobianLoss(squared=False)(batch)
    assert torch.allclose(second, eq10_reference(student, teacher, x, top1, squared=False), atol=1e-10)
    # rows the cache lacks need the teacher recomputed: refused clearly without teacher_fn ...
    with pytest.raises(ValueError, match="already used by an earlier term.*teacher_fn"):
        JacobianLoss(classes="all")(batch)
    # ... and computed from teacher_fn when given, appended to the cache
    batch.teacher_fn = teacher
    value = JacobianLoss(classes="all")(batch)
    assert torch.allclose(value, eq10_reference(student, teacher, x, torch.arange(C).expand(B, C)), atol=1e-10)
    assert batch.cache[CACHE_ROWS].shape == (B, 1 + C)


def test_prefilled_cache_serves_a_teacher_without_graph(nets):
    student, teacher, x = nets
    batch = make_batch(student, teacher, x, teacher_graph=False)
    with pytest.raises(ValueError, match="carry no graph"):
        JacobianLoss()(batch)
    top1 = teacher(x).argmax(1, keepdim=True)
    batch.cache[CACHE_ROWS] = torch.arange(C).expand(B, C).flip(1)  # any order per sample
    batch.cache[CACHE_JACOBIAN_ROWS] = per_sample_reference(teacher, x).flip(1)
    value = JacobianLoss()(batch)
    assert torch.allclose(value, eq10_reference(student, teacher, x, top1), atol=1e-10)


def test_zero_jacobian_rows_are_guarded(nets):
    """A dead student (zero Jacobian) or teacher gives finite values and gradients, not NaN."""
    _, teacher, x = nets
    dead = nn.Sequential(nn.Linear(D, C), nn.ReLU()).double()
    with torch.no_grad():
        dead[0].weight.zero_()
        dead[0].bias.fill_(-1.0)  # every ReLU off: ds/dx = 0 everywhere
    value = JacobianLoss()(make_batch(dead, teacher, x))
    assert torch.isfinite(value) and torch.allclose(value, torch.tensor(1.0, dtype=torch.float64))
    value.backward()
    assert all(torch.isfinite(p.grad).all() for p in dead.parameters())
    plain = JacobianLoss(squared=False)(make_batch(dead, dead, x))
    assert plain == 0
    plain.backward()
    assert all(torch.isfinite(p.grad).all() for p in dead.parameters())


def test_refuses_inputs_without_grad(nets):
    student, teacher, x = nets
    batch = DistillBatch(inputs=x, student_logits=student(x), teacher_logits=teacher(x))
    with pytest.raises(ValueError, match="requires_grad_\\(True\\) BEFORE the student's forward"):
        JacobianLoss()(batch)


@pytest.mark.parametrize(
    "factory, message",
    [
        (lambda: JacobianLoss(classes="everything"), "classes='everything' is not one of"),
        (lambda: JacobianLoss(classes="topk", k=0), "k must be a positive integer"),
        (lambda: JacobianLoss(k=3), "only applies to classes='topk'"),
        (lambda: JacobianLoss(eps=0), "eps must be a finite number > 0"),
        (lambda: ProjectedJacobianLoss(k=1.5), "k must be a positive integer"),
        (lambda: DirectionalJacobianLoss(method="backward"), "method='backward' is not one of"),
        (lambda: DirectionalJacobianLoss(step=-1), "step must be a finite number > 0"),
        (lambda: NoisyDistillLoss(sigma=0), "sigma must be a finite number > 0"),
        (lambda: NoisyDistillLoss(samples=0), "samples must be a positive integer"),
    ],
)
def test_bad_options_are_user_errors(factory, message):
    with pytest.raises(UserError, match=message):
        factory()


def test_runtime_refusals(nets):
    student, teacher, x = nets
    with pytest.raises(UserError, match="k=9 exceeds the 4 classes"):
        JacobianLoss(classes="topk", k=9)(make_batch(student, teacher, x))
    with pytest.raises(UserError, match="use a reverse-mode backend.*'jacobian-direction'"):
        JacobianLoss(backend="forward")(make_batch(student, teacher, x))


@pytest.mark.parametrize("normalize", [False, True])
def test_projected_matches_hand_computation(nets, normalize):
    student, teacher, x = nets
    torch.manual_seed(11)
    value = ProjectedJacobianLoss(k=3, normalize=normalize)(make_batch(student, teacher, x))
    torch.manual_seed(11)
    v = torch.randn(B, 3, C, dtype=torch.float64)  # the term's draw, replayed
    p_s = torch.einsum("bkc,bcn->bkn", v, per_sample_reference(student, x))
    p_t = torch.einsum("bkc,bcn->bkn", v, per_sample_reference(teacher, x))
    if normalize:
        p_s, p_t = p_s / p_s.norm(dim=-1, keepdim=True), p_t / p_t.norm(dim=-1, keepdim=True)
    assert torch.allclose(value, ((p_s - p_t) ** 2).sum(-1).mean(), atol=1e-10)


def test_projected_is_unbiased_for_the_frobenius_distance(nets):
    student, teacher, x = nets
    frobenius = ((per_sample_reference(student, x) - per_sample_reference(teacher, x)) ** 2).sum((1, 2)).mean()
    torch.manual_seed(0)
    estimate = ProjectedJacobianLoss(k=1000)(make_batch(student, teacher, x))
    # relative standard deviation <= sqrt(2 / (k * B)) = 2.2%; allow about 4 of them
    assert abs(float(estimate.detach() / frobenius) - 1) < 0.09
    estimate.backward()
    assert weights_trained(student)


def test_projected_uses_a_cached_full_teacher_jacobian(nets):
    student, teacher, x = nets
    batch = make_batch(student, teacher, x, teacher_graph=False)
    batch.cache[CACHE_ROWS] = torch.arange(C).expand(B, C)
    batch.cache[CACHE_JACOBIAN_ROWS] = per_sample_reference(teacher, x)
    torch.manual_seed(5)
    cached = ProjectedJacobianLoss(k=2)(batch)
    torch.manual_seed(5)
    assert torch.allclose(cached, ProjectedJacobianLoss(k=2)(make_batch(student, teacher, x)), atol=1e-10)


@pytest.mark.parametrize("method, scheme, atol", [("forward", "forward", 1e-10), ("finite-difference", "forward", 1e-6),
                                                  ("finite-difference", "central", 1e-6)])
@pytest.mark.parametrize("normalize", [False, True])
def test_direction_matches_hand_computation(nets, method, scheme, atol, normalize):
    student, teacher, x = nets
    torch.manual_seed(13)
    term = DirectionalJacobianLoss(k=2, method=method, normalize=normalize, scheme=scheme)
    value = term(make_batch(student, teacher, x, with_fns=True))
    torch.manual_seed(13)
    u = torch.randn(B, 2, D, dtype=torch.float64)
    d_s = torch.einsum("bcn,bkn->bkc", per_sample_reference(student, x), u)
    d_t = torch.einsum("bcn,bkn->bkc", per_sample_reference(teacher, x), u)
    if normalize:
        d_s, d_t = d_s / d_s.norm(dim=-1, keepdim=True), d_t / d_t.norm(dim=-1, keepdim=True)
    assert torch.allclose(value, ((d_s - d_t) ** 2).sum(-1).mean(), atol=atol)
    value.backward()
    assert weights_trained(student)


def test_direction_needs_the_models_as_callables(nets):
    student, teacher, x = nets
    with pytest.raises(ValueError, match="needs student_fn, teacher_fn"):
        DirectionalJacobianLoss()(make_batch(student, teacher, x))


def test_noisy_distill_equals_output_plus_jacobian_matching_for_affine_models():
    """For affine S, T: E ||S(x + sz) - T(x + sz)||^2 = ||S(x) - T(x)||^2 + s^2 ||J_S - J_T||_F^2."""
    torch.manual_seed(2)
    student, teacher = nn.Linear(D, C).double(), nn.Linear(D, C).double().requires_grad_(False)
    x, sigma = torch.randn(B, D, dtype=torch.float64), 0.3
    batch = DistillBatch(inputs=x, student_logits=student(x), student_fn=student, teacher_fn=teacher)
    torch.manual_seed(21)
    value = NoisyDistillLoss(sigma=sigma, samples=3)(batch)
    torch.manual_seed(21)
    noisy = (x[:, None] + sigma * torch.randn(B, 3, D, dtype=torch.float64)).flatten(0, 1)
    assert torch.allclose(value, ((student(noisy) - teacher(noisy)) ** 2).sum(-1).mean(), atol=1e-12)

    with torch.no_grad():
        difference = student.weight - teacher.weight
        expected = ((student(x) - teacher(x)) ** 2).sum(-1).mean() + sigma**2 * (difference**2).sum()
    torch.manual_seed(0)
    estimate = NoisyDistillLoss(sigma=sigma, samples=4000)(batch)
    assert abs(float(estimate.detach() / expected) - 1) < 0.03
    estimate.backward()
    assert weights_trained(student)
