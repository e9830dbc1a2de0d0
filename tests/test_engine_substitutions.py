"""Op substitutions: same values and first derivatives as the ops they replace, and the derivatives
the Jacobian terms take (double backward, forward-over-reverse) exist and are right (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jacplug import jacobian, jvp
from jacplug.engine.backends import _graph_contains
from jacplug.engine.substitutions import (
    BUILTIN_SUBSTITUTIONS,
    composite_batch_norm,
    composite_layer_norm,
    composite_log_softmax,
    composite_softmax,
    double_differentiable,
    forward_mode_attention,
    forward_mode_safe,
    hardsigmoid,
    hardswish,
    math_attention,
    registered_substitutions,
)
from jacplug.losses import DirectionalJacobianLoss, DistillBatch

f64 = torch.float64


def _same_value_and_grad(original, replacement, *inputs):
    leaves = [t.clone().requires_grad_(True) for t in inputs]
    copies = [t.clone().requires_grad_(True) for t in inputs]
    a, b = original(*leaves), replacement(*copies)
    torch.testing.assert_close(b, a)
    g = torch.randn_like(a)
    for x, y in zip(torch.autograd.grad(a, leaves, g), torch.autograd.grad(b, copies, g)):
        torch.testing.assert_close(y, x)


def test_elementwise_replacements_match_values_and_first_derivatives():
    x = torch.linspace(-5, 5, 101, dtype=f64)[torch.randperm(101)] + 0.013  # away from the kinks at +-3
    _same_value_and_grad(F.hardsigmoid, hardsigmoid, x)
    _same_value_and_grad(F.hardswish, hardswish, x)
    s = torch.randn(3, 4, 5, dtype=f64)
    for dim in (0, 1, -1):
        _same_value_and_grad(lambda t: F.softmax(t, dim), lambda t: composite_softmax(t, dim), s)
        _same_value_and_grad(lambda t: F.log_softmax(t, dim), lambda t: composite_log_softmax(t, dim), s)


def test_norm_replacements_match_values_derivatives_and_running_stats():
    x = torch.randn(6, 4, 3, 3, dtype=f64) * 2 + 1
    w, b = torch.randn(4, dtype=f64), torch.randn(4, dtype=f64)
    _same_value_and_grad(lambda t: F.layer_norm(t, (3, 3)), lambda t: composite_layer_norm(t, (3, 3)), x)
    _same_value_and_grad(
        lambda t, w, b: F.layer_norm(t.movedim(1, -1), (4,), w, b).movedim(-1, 1),
        lambda t, w, b: composite_layer_norm(t.movedim(1, -1), (4,), w, b).movedim(-1, 1),
        x, w, b,
    )
    native = [torch.zeros(4, dtype=f64), torch.ones(4, dtype=f64)]
    composite = [t.clone() for t in native]
    _same_value_and_grad(
        lambda t, w, b: F.batch_norm(t, *native, w, b, True, 0.1, 1e-5),
        lambda t, w, b: composite_batch_norm(t, *composite, w, b, True, 0.1, 1e-5),
        x, w, b,
    )
    for ours, theirs in zip(composite, native):
        torch.testing.assert_close(ours, theirs)  # the same running-statistics update, unbiased variance


@pytest.mark.parametrize("options", [{}, {"is_causal": True}, {"scale": 0.3}, {"mask": True}, {"enable_gqa": True}])
def test_math_attention_matches_scaled_dot_product_attention(options):
    torch.manual_seed(0)
    q = torch.randn(2, 4, 5, 8, dtype=f64)
    heads = 2 if options.get("enable_gqa") else 4
    k, v = torch.randn(2, heads, 5, 8, dtype=f64), torch.randn(2, heads, 5, 8, dtype=f64)
    kwargs = {key: value for key, value in options.items() if key != "mask"}
    if options.get("enable_gqa"):
        try:
            F.scaled_dot_product_attention(q, q, q, enable_gqa=True)
        except TypeError:
            pytest.skip("this torch's scaled_dot_product_attention has no enable_gqa (added in torch 2.5)")
    if options.get("mask"):
        kwargs["attn_mask"] = torch.randn(5, 5, dtype=f64)
    for ours in (math_attention, forward_mode_attention):
        _same_value_and_grad(
            lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **kwargs),
            lambda q, k, v: ours(q, k, v, **kwargs),
            q, k, v,
        )


class Attention(nn.Module):
    """A minimal timm-style block: fused attention and a hard-sigmoid gate."""

    def __init__(self, dim: int = 8, heads: int = 2, classes: int = 3) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.norm, self.head = nn.Linear(dim, 3 * dim), nn.LayerNorm(dim), nn.Linear(dim, classes)
        self.gate = nn.Hardsigmoid()

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        return self.head((x + y * self.gate(y)).mean(1))


def test_double_backward_through_fused_attention_and_hardsigmoid_matches_finite_differences():
    torch.manual_seed(0)
    model = Attention().double()
    x = torch.randn(2, 4, 8, dtype=f64)

    def input_gradient(x):
        with double_differentiable():
            out = model(x)
        return torch.autograd.grad(out[:, 0].sum(), x, create_graph=True)[0]

    # the input gradient's own derivatives (second order: the double backward) against finite differences
    assert torch.autograd.gradcheck(input_gradient, (x.requires_grad_(True),))


def test_forward_mode_parameter_gradients_equal_full_reverse_jacobians():
    """``d/dtheta w . (J u)`` from ``jvp(method="forward")`` against ``autograd.functional.jacobian``
    with ``create_graph=True``, through LayerNorm, train-mode BatchNorm, softmax and attention."""
    torch.manual_seed(0)
    models = {
        "layernorm": nn.Sequential(nn.Flatten(), nn.Linear(32, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 3)),
        "batchnorm": nn.Sequential(nn.Flatten(), nn.Linear(32, 16), nn.BatchNorm1d(16), nn.Tanh(), nn.Linear(16, 3)),
        "softmax": nn.Sequential(nn.Flatten(), nn.Linear(32, 16), nn.Softmax(-1), nn.Linear(16, 3)),
        "attention": Attention(),
    }
    x = torch.randn(3, 4, 8, dtype=f64)
    u = torch.randn_like(x)
    for name, model in models.items():
        model = model.double().train()
        with torch.no_grad():
            w = torch.randn_like(model(x))
        with double_differentiable():
            full = torch.autograd.functional.jacobian(model, x, create_graph=True)  # [B, C, B, *S]
        reference = (full * u.view(1, 1, *u.shape)).flatten(2).sum(-1)  # the batch's J u, [B, C]
        expected = torch.autograd.grad((reference * w).sum(), list(model.parameters()), allow_unused=True)
        got = torch.autograd.grad((jvp(model, x, u) * w).sum(), list(model.parameters()), allow_unused=True)
        for g, e in zip(got, expected):
            torch.testing.assert_close(
                torch.zeros(()) if g is None else g, torch.zeros(()) if e is None else e, msg=name
            )


def test_direction_term_default_method_trains_a_layernorm_student_correctly():
    """The default ``jacobian-direction`` term's parameter gradient equals the one from full
    reverse-mode Jacobians (it was 19 % off through LayerNorm before forward mode was made safe)."""
    torch.manual_seed(1)
    student = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 4)).double()
    teacher = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4)).double().requires_grad_(False)
    x = torch.randn(5, 6, dtype=f64)
    term = DirectionalJacobianLoss(k=2)
    assert term.method == "forward"
    torch.manual_seed(7)
    batch = DistillBatch(inputs=x, student_logits=student(x), teacher_logits=teacher(x), student_fn=student,
                         teacher_fn=teacher)
    got = torch.autograd.grad(term(batch), list(student.parameters()), allow_unused=True)
    torch.manual_seed(7)
    u = torch.randn(5, 2, 6, dtype=f64)  # the term's own draw
    j_s = torch.autograd.functional.jacobian(student, x, create_graph=True).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    j_t = torch.autograd.functional.jacobian(teacher, x).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    reference = torch.einsum("bcd,bkd->bkc", j_s - j_t, u).pow(2).sum(-1).mean()
    expected = torch.autograd.grad(reference, list(student.parameters()), allow_unused=True)
    for g, e in zip(got, expected):  # the last bias does not enter J: None in both
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e)


def test_substitutions_reach_their_call_sites_only_inside_the_context():
    calls = []
    probe = type(BUILTIN_SUBSTITUTIONS[0])(
        "probe", (F.gelu,), lambda x, approximate="none": calls.append(1) or F.gelu(x), frozenset({"double_backward"}), ""
    )
    model = nn.Sequential(nn.Linear(3, 3), nn.GELU())
    model(torch.randn(2, 3))
    assert calls == []
    with double_differentiable([probe]):
        model(torch.randn(2, 3))
    assert calls == [1]
    with forward_mode_safe([probe]):  # a double-backward substitution is not a forward-mode one
        model(torch.randn(2, 3))
    assert calls == [1]


def test_builtin_substitutions_are_registered_through_the_plugin_hook():
    names = {s.name for s in registered_substitutions()}
    assert names == {s.name for s in BUILTIN_SUBSTITUTIONS}


def _small_cnn() -> nn.Module:
    """Dense, strided, weight-standardised (timm's ``StdConv2d``: its weight goes through a train-mode
    ``F.batch_norm``) and depthwise convolutions, with BatchNorm."""
    from timm.layers import StdConv2d

    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), StdConv2d(4, 8, 3, padding=1),
        nn.Conv2d(8, 8, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(8, 4, 3, stride=2),
        nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5),
    ).double()


@pytest.mark.parametrize("backend", ["loop", "batched"])
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_jacobian_term_gradients_through_a_network_match_native(backend, layout):
    """The substitutions made for cost (BatchNorm, convolution): every parameter's gradient of ``|J|^2``
    (all five rows, so the ``batched`` backend vmaps the backward) equals the one PyTorch's own double
    backward gives, and both substitutions were in the graph."""
    torch.manual_seed(4)
    net = _small_cnn().to(memory_format=layout)
    x = torch.randn(6, 3, 8, 8, dtype=f64).contiguous(memory_format=layout).requires_grad_(True)
    grads = []
    for substituted in (False, True):
        net.zero_grad()
        with double_differentiable() if substituted else torch.enable_grad():
            out = net(x)
        assert _graph_contains(out.grad_fn, ("_TrainBatchNorm",)) == substituted
        assert _graph_contains(out.grad_fn, ("_Convolution",)) == substituted
        assert _graph_contains(out.grad_fn, ("BatchNorm",))  # the auto backend's CPU rule still sees it
        jac = jacobian(out, x, torch.arange(5).expand(6, 5), backend=backend)
        jac.pow(2).sum().backward()
        grads.append([torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in net.parameters()])
    for native, ours in zip(*grads):
        torch.testing.assert_close(ours, native)
