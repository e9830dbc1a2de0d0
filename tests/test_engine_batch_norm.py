"""The closed-form BatchNorm double backward: same values, running statistics and first derivatives as
``F.batch_norm``, the same second derivatives as PyTorch's own (float64); through a network with the
convolution substitution: tests/test_engine_substitutions.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from jacplug.engine.batch_norm import batch_norm

f64 = torch.float64

SHAPES = {
    "2d": (6, 4, 3, 3),
    "channels-last": (6, 4, 3, 3),
    "1d-sequence": (5, 3, 7),
    "1d-features": (8, 5),
}


def _input(case: str, dtype=f64) -> torch.Tensor:
    x = torch.randn(*SHAPES[case], dtype=dtype) * 2 + 0.5
    return x.contiguous(memory_format=torch.channels_last) if case == "channels-last" else x


@pytest.mark.parametrize("case", SHAPES)
@pytest.mark.parametrize("affine", [True, False])
def test_values_running_statistics_and_first_derivatives_match_batch_norm(case, affine):
    torch.manual_seed(0)
    x = _input(case)
    c = x.shape[1]
    w, b = (torch.randn(c, dtype=f64), torch.randn(c, dtype=f64)) if affine else (None, None)
    stats = {name: [torch.randn(c, dtype=f64), torch.rand(c, dtype=f64) + 0.5] for name in ("native", "ours")}
    stats["ours"] = [t.clone() for t in stats["native"]]
    leaves = {name: [t.clone().requires_grad_(True) for t in (x, w, b) if t is not None] for name in stats}

    def run(fn, name):
        x_, *params = leaves[name]
        w_, b_ = params if affine else (None, None)
        return fn(x_, *stats[name], w_, b_, True, 0.3, 1e-3)

    native, ours = run(F.batch_norm, "native"), run(batch_norm, "ours")
    torch.testing.assert_close(ours, native)
    for mine, theirs in zip(stats["ours"], stats["native"]):
        torch.testing.assert_close(mine, theirs)  # running mean and unbiased running variance
    g = torch.randn_like(native)
    for mine, theirs in zip(torch.autograd.grad(ours, leaves["ours"], g), torch.autograd.grad(native, leaves["native"], g)):
        torch.testing.assert_close(mine, theirs)


def test_eval_mode_is_the_native_affine_layer():
    x, mean, var = torch.randn(4, 3, 5, 5, dtype=f64), torch.randn(3, dtype=f64), torch.rand(3, dtype=f64) + 0.5
    w, b = torch.randn(3, dtype=f64), torch.randn(3, dtype=f64)
    y = batch_norm(x.requires_grad_(True), mean, var, w, b, False)
    torch.testing.assert_close(y, F.batch_norm(x, mean, var, w, b, False))
    assert "NativeBatchNorm" in y.grad_fn.name()


# which outputs of the first backward the loss uses: the input gradient (a Jacobian row), the
# parameter gradients (a penalty on them), or all three
USES = {"grad-input": (1, 0, 0), "grad-params": (0, 1, 1), "all": (1, 1, 1)}


@pytest.mark.parametrize("case", ["2d", "channels-last", "1d-features"])
@pytest.mark.parametrize("use", USES)
def test_second_derivatives_match_pytorchs_double_backward(case, use):
    torch.manual_seed(1)
    x0 = _input(case)
    c = x0.shape[1]
    w0, b0, gy0 = torch.randn(c, dtype=f64), torch.randn(c, dtype=f64), torch.randn_like(x0)
    probes = [torch.randn_like(x0), torch.randn(c, dtype=f64), torch.randn(c, dtype=f64)]
    results = []
    for fn in (F.batch_norm, batch_norm):
        x, w, b, gy = (t.clone().requires_grad_(True) for t in (x0, w0, b0, gy0))
        y = fn(x, None, None, w, b, True, 0.1, 1e-5)
        first = torch.autograd.grad(y, (x, w, b), gy, create_graph=True)
        loss = sum((t * p).sum() * used for t, p, used in zip(first, probes, USES[use]))
        # gy's gradient is what flows on through the rest of the backward graph
        results.append(torch.autograd.grad(loss, (x, w, gy), allow_unused=True, materialize_grads=True))
    for theirs, ours in zip(*results):
        torch.testing.assert_close(ours, theirs)


def test_gradgradcheck():
    torch.manual_seed(2)
    x = torch.randn(3, 2, 4, 4, dtype=f64, requires_grad=True)
    w, b = torch.randn(2, dtype=f64, requires_grad=True), torch.randn(2, dtype=f64, requires_grad=True)
    fn = lambda x, w, b: batch_norm(x, None, None, w, b, True)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, w, b))
    assert torch.autograd.gradgradcheck(fn, (x, w, b))


def test_bfloat16_maps_second_derivatives_stay_close_to_float64():
    """Under bf16 autocast BatchNorm sees bf16 maps and float32 parameters; the closed form reduces in
    float32, so its error is the inputs' rounding, no worse than PyTorch's own bf16 double backward."""
    torch.manual_seed(3)
    x0, gy0, probe = torch.randn(16, 8, 6, 6, dtype=f64), torch.randn(16, 8, 6, 6, dtype=f64), torch.randn(16, 8, 6, 6)
    w0 = torch.randn(8, dtype=f64)

    def second(fn, dtype):
        x, gy = (t.to(dtype).requires_grad_(True) for t in (x0, gy0))
        w = w0.clone().float().requires_grad_(True) if dtype != f64 else w0.clone().requires_grad_(True)
        gx, = torch.autograd.grad(fn(x, None, None, w, None, True), x, gy, create_graph=True)
        return torch.autograd.grad((gx * probe.to(gx.dtype)).sum(), (x, w, gy))

    exact = second(F.batch_norm, f64)
    errors = {}
    for name, fn in (("native", F.batch_norm), ("ours", batch_norm)):
        got = second(fn, torch.bfloat16)
        assert [t.dtype for t in got] == [torch.bfloat16, torch.float32, torch.bfloat16]
        errors[name] = [((g.double() - e).norm() / e.norm()).item() for g, e in zip(got, exact)]
    for ours, native in zip(errors["ours"], errors["native"]):
        assert ours <= max(1.5 * native, 1e-2), errors


def test_one_value_per_channel_is_refused_like_batch_norm():
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        batch_norm(torch.randn(1, 3), None, None, training=True)
