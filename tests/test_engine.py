"""The Jacobian engine against torch.autograd.functional.jacobian, in float64."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import jacplug
from jacplug.engine import JacobianArgumentError, default_step
from jacplug.errors import UnknownNameError

from conftest import per_sample_reference, small_convnet, small_mlp

REVERSE = ["loop", "batched", "auto"]
CALLABLE_ONLY = ["forward", "finite-difference"]
TOL = {"loop": 1e-12, "batched": 1e-12, "auto": 1e-12, "forward": 1e-12, "finite-difference": 1e-7}


def _inputs(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()


@pytest.mark.parametrize("backend", REVERSE + CALLABLE_ONLY)
def test_all_rows_match_autograd_functional(convnet, backend):
    x = _inputs(3, 2, 5, 5)
    ref = per_sample_reference(convnet, x)
    f = convnet(x) if backend in REVERSE else convnet
    jac = jacplug.jacobian(f, x, backend=backend)
    assert jac.shape == (3, 5, 2, 5, 5)
    torch.testing.assert_close(jac, ref, atol=TOL[backend], rtol=TOL[backend])


@pytest.mark.parametrize("backend", REVERSE + CALLABLE_ONLY)
def test_selected_rows_per_sample(convnet, backend):
    x = _inputs(4, 2, 5, 5, seed=1)
    ref = per_sample_reference(convnet, x)
    rows = torch.tensor([[0, 4], [3, 3], [1, 2], [4, 0]])
    f = convnet(x) if backend in REVERSE else convnet
    jac = jacplug.jacobian(f, x, rows, backend=backend)
    expected = torch.stack([ref[b, rows[b]] for b in range(4)])
    torch.testing.assert_close(jac, expected, atol=TOL[backend], rtol=TOL[backend])
    top1 = rows[:, 0]
    f = convnet(x) if backend in REVERSE else convnet
    single = jacplug.jacobian(f, x, top1, backend=backend)
    assert single.shape == (4, 1, 2, 5, 5)
    torch.testing.assert_close(single[:, 0], ref[torch.arange(4), top1], atol=TOL[backend], rtol=TOL[backend])


def test_in_place_relu_and_mlp():
    torch.manual_seed(3)
    net = nn.Sequential(nn.Flatten(), nn.Linear(6, 7), nn.ReLU(inplace=True), nn.Linear(7, 3)).double()
    x = _inputs(5, 2, 3, seed=2)
    ref = per_sample_reference(net, x)
    torch.testing.assert_close(jacplug.jacobian(net(x), x), ref)
    torch.testing.assert_close(jacplug.jacobian(net, x, backend="forward"), ref)


def test_train_mode_batchnorm_semantics():
    """In train mode samples interact through batch statistics: reverse backends return the column
    sum over the batch, forward mode the row sum (docs/jacobian.md); both differ from the diagonal."""
    torch.manual_seed(0)
    net = small_convnet().double().train()
    x = _inputs(3, 2, 5, 5, seed=4)
    full = torch.autograd.functional.jacobian(net, x.detach())  # [B, C, B, *S]
    column_sum = full.sum(0).permute(1, 0, 2, 3, 4)  # sum over output sample b'
    row_sum = full.sum(2)  # sum over input sample b'
    torch.testing.assert_close(jacplug.jacobian(net(x), x, backend="loop"), column_sum)
    torch.testing.assert_close(jacplug.jacobian(net(x), x, backend="batched"), column_sum)
    torch.testing.assert_close(jacplug.jacobian(net, x, backend="forward"), row_sum)
    diagonal = torch.stack([full[b, :, b] for b in range(3)])
    assert not torch.allclose(column_sum, diagonal)


def test_create_graph_reaches_parameters_and_teacher_has_no_graph(convnet):
    x = _inputs(2, 2, 5, 5)
    out = convnet(x)
    jac = jacplug.jacobian(out, x, torch.tensor([0, 1]))
    assert jac.requires_grad and jac.grad_fn is not None
    grads = torch.autograd.grad(jac.square().sum(), list(convnet.parameters()), allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    teacher_out = convnet(x)
    teacher_jac = jacplug.jacobian(teacher_out, x, torch.tensor([0, 1]), create_graph=False)
    assert not teacher_jac.requires_grad
    with pytest.raises(RuntimeError, match="backward through the graph a second time"):
        torch.autograd.grad(teacher_out.sum(), x)  # the teacher's graph was freed at once


def _matching_loss(student: nn.Module, teacher_jac: torch.Tensor, x: torch.Tensor, rows: torch.Tensor, backend: str):
    x = x.detach().requires_grad_()
    f = student(x) if backend in REVERSE else student
    s = jacplug.jacobian(f, x, rows, backend=backend).flatten(2)
    s = s / s.norm(dim=2, keepdim=True).clamp_min(1e-12)
    return (s - teacher_jac).square().sum(2).mean()


@pytest.mark.parametrize("backend", ["loop", "batched", "forward"])
def test_gradcheck_and_gradgradcheck_of_matching_loss_wrt_student_parameters(backend):
    torch.manual_seed(0)
    student = small_mlp(4, 3).double()
    teacher = small_mlp(4, 3).double()
    x = _inputs(3, 4, seed=5)
    rows = teacher(x).argmax(1)
    t = jacplug.jacobian(teacher(x), x, rows, create_graph=False).flatten(2)
    t = t / t.norm(dim=2, keepdim=True)
    names = [n for n, _ in student.named_parameters()]
    params = tuple(p.detach().clone().requires_grad_() for p in student.parameters())

    def loss_of(*values):
        state = dict(zip(names, values))
        return _matching_loss(lambda z: torch.func.functional_call(student, state, (z,)), t, x, rows, backend)

    assert torch.autograd.gradcheck(loss_of, params)
    assert torch.autograd.gradgradcheck(loss_of, params)


def test_vjp_and_projection_shapes(convnet):
    x = _inputs(3, 2, 5, 5)
    ref = per_sample_reference(convnet, x).flatten(2)
    out = convnet(x)
    v = torch.randn(3, 4, 5, dtype=torch.float64)
    prod = jacplug.vjp(out, x, v)
    assert prod.shape == (3, 4, 2, 5, 5)
    torch.testing.assert_close(prod.flatten(2), torch.einsum("bkc,bcd->bkd", v, ref))
    torch.testing.assert_close(jacplug.vjp(out, x, v[:, 0]).flatten(1), torch.einsum("bc,bcd->bd", v[:, 0], ref))
    torch.testing.assert_close(jacplug.vjp(out, x, v, batched=True), prod)


@pytest.mark.parametrize("method,scheme,tol", [("forward", "central", 1e-12), ("finite-difference", "central", 1e-7),
                                               ("finite-difference", "forward", 1e-5)])
def test_jvp_matches_reference(convnet, method, scheme, tol):
    x = _inputs(3, 2, 5, 5)
    ref = per_sample_reference(convnet, x).flatten(2)
    u = torch.randn(3, 2, 2, 5, 5, dtype=torch.float64)
    prod = jacplug.jvp(convnet, x, u, method=method, scheme=scheme)
    assert prod.shape == (3, 2, 5)
    torch.testing.assert_close(prod, torch.einsum("bcd,bkd->bkc", ref, u.flatten(2)), atol=tol, rtol=tol)
    assert prod.requires_grad
    single = jacplug.jvp(convnet, x, u[:, 0], method=method, scheme=scheme, outputs=convnet(x))
    torch.testing.assert_close(single, prod[:, 0], atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("scheme", ["forward", "central"])
def test_default_finite_difference_step_balances_truncation_and_rounding(dtype, scheme):
    """The default step (``step=None``) is more accurate than ten times larger (truncation error
    grows) or ten times smaller (rounding error grows), for each dtype and scheme."""
    torch.manual_seed(0)
    net = small_mlp(6, 3).double()
    x, u = torch.randn(8, 6, dtype=torch.float64), torch.randn(8, 6, dtype=torch.float64)
    exact = jacplug.jvp(net, x, u, create_graph=False)
    net = net.to(dtype)

    def error(step: float | None) -> float:
        approx = jacplug.jvp(net, x.to(dtype), u.to(dtype), method="finite-difference", scheme=scheme, step=step,
                             create_graph=False)
        return float((approx.double() - exact).abs().max())

    h = default_step(dtype, scheme)
    assert error(None) < min(error(h / 10), error(h * 10))


def test_float32_finite_difference_is_close_to_exact():
    torch.manual_seed(0)
    net = small_mlp(6, 3)
    x = torch.randn(4, 6)
    u = torch.randn(4, 6)
    exact = jacplug.jvp(net, x, u)
    approx = jacplug.jvp(net, x, u, method="finite-difference")
    torch.testing.assert_close(approx, exact, atol=1e-3, rtol=1e-3)


def test_clear_errors(convnet):
    x = _inputs(2, 2, 5, 5)
    plain = x.detach()
    with pytest.raises(JacobianArgumentError, match="requires_grad_"):
        jacplug.jacobian(convnet(plain), plain)
    with torch.no_grad():
        detached = convnet(x)
    with pytest.raises(JacobianArgumentError, match="no autograd graph"):
        jacplug.jacobian(detached, x)
    out = convnet(x)
    with pytest.raises(JacobianArgumentError, match="callable"):
        jacplug.jacobian(out, x, backend="forward")
    with pytest.raises(JacobianArgumentError, match=r"\[B, C\]"):
        jacplug.jacobian(out.unsqueeze(2), x)
    with pytest.raises(JacobianArgumentError, match="C = 5 classes"):
        jacplug.jacobian(out, x, torch.tensor([0, 7]))
    with pytest.raises(JacobianArgumentError, match=r"\[B\] or \[B, R\]"):
        jacplug.jacobian(out, x, torch.tensor([0, 1, 2]))
    with pytest.raises(JacobianArgumentError, match="integer tensor"):
        jacplug.jacobian(out, x, torch.tensor([0.0, 1.0]))
    other = _inputs(2, 2, 5, 5, seed=9)
    with pytest.raises(JacobianArgumentError, match="do not depend on inputs"):
        jacplug.jacobian(convnet(other), x)
    with pytest.raises(UnknownNameError, match="did you mean 'loop'"):
        jacplug.jacobian(out, x, backend="lop")
    with pytest.raises(JacobianArgumentError, match="pass the model"):
        jacplug.jvp(out, x, x)
    with pytest.raises(JacobianArgumentError, match=r"\[B, k, \*S\]"):
        jacplug.jvp(convnet, x, torch.randn(2, 50, dtype=torch.float64))
    with pytest.raises(JacobianArgumentError, match=r"\[B, C\] or \[B, k, C\]"):
        jacplug.vjp(out, x, torch.randn(2, 4, dtype=torch.float64))


def test_callable_accepts_inputs_without_grad(convnet):
    x = _inputs(2, 2, 5, 5).detach()
    ref = per_sample_reference(convnet, x)
    torch.testing.assert_close(jacplug.jacobian(convnet, x, backend="loop"), ref)


def test_auto_backend_follows_the_measured_cpu_rule(convnet):
    from jacplug.engine import AutoBackend, BatchedBackend, LoopBackend

    auto = AutoBackend()
    x = _inputs(2, 2, 5, 5)
    conv_out = convnet(x)
    mlp_out = small_mlp(50, 5).double()(x)
    assert isinstance(auto.choose(conv_out, 3), LoopBackend)
    assert isinstance(auto.choose(mlp_out, 3), BatchedBackend)
    assert isinstance(auto.choose(mlp_out, 1), LoopBackend)
