"""The start-up probe: an op without the derivative a term takes is refused in one line naming the op,
the module and what works instead; forward mode that PyTorch gets wrong is refused; a supported
student passes and the probe leaves no trace."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from jacplug.errors import UserError
from jacplug.losses import build_loss
from jacplug.distiller import Distiller


def probe_terms(loss, student, teacher, x, y, name):
    return Distiller(student, teacher, loss, name=name).check(x, y)


class RawHardSigmoid(nn.Module):
    """Calls the C binding directly, past the call site a substitution reaches."""

    def forward(self, x):
        return torch._C._nn.hardsigmoid(x)


class RawLayerNorm(nn.LayerNorm):
    """``torch.layer_norm`` instead of ``F.layer_norm``: PyTorch's wrong forward-mode derivative."""

    def forward(self, x):
        return torch.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def net(act: nn.Module, norm: nn.Module | None = None) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 12), norm or nn.Identity(), act, nn.Linear(12, 3))


def batch():
    g = torch.Generator().manual_seed(0)
    return torch.randn(8, 1, 4, 4, generator=g), torch.randint(0, 3, (8,), generator=g)


def teacher() -> nn.Module:
    return net(nn.Tanh()).eval().requires_grad_(False)


def test_an_op_without_double_backward_is_refused_naming_op_module_and_alternatives():
    x, y = batch()
    with pytest.raises(UserError) as info:
        probe_terms(build_loss(["kd=1", "jacobian=10"]), net(RawHardSigmoid()), teacher(), x, y, "mynet")
    message = str(info.value)
    assert "\n" not in message
    assert "student 'mynet' cannot run terms jacobian" in message
    assert "aten::hardsigmoid_backward" in message and "module 3 (RawHardSigmoid)" in message
    assert "jacobian-direction:method=finite-difference or noisy-distill" in message


def test_the_same_op_through_F_is_substituted_and_every_term_trains():
    x, y = batch()
    loss = build_loss(["kd=1", "jacobian=10", "jacobian-projected=1", "jacobian-direction=1", "noisy-distill=1"])
    report = probe_terms(loss, net(nn.Hardsigmoid(), nn.LayerNorm(12)), teacher(), x, y, "ok")
    assert {r.name: r.status for r in report} == dict.fromkeys(loss.terms, "ok")


def test_forward_mode_that_pytorch_gets_wrong_is_refused_and_finite_differences_pass():
    x, y = batch()
    student = net(nn.GELU(), RawLayerNorm(12))
    with pytest.raises(UserError, match=r"forward-mode parameter gradients differ from reverse mode by \d+"):
        probe_terms(build_loss(["kd=1", "jacobian-direction=1"]), student, teacher(), x, y, "raw")
    report = probe_terms(build_loss(["kd=1", "jacobian-direction=1:method=finite-difference"]), student, teacher(),
                         x, y, "raw")
    assert all(r.status == "ok" for r in report)


def test_the_probe_leaves_no_trace():
    x, y = batch()
    student = nn.Sequential(nn.Flatten(), nn.Linear(16, 12), nn.BatchNorm1d(12), nn.ReLU(), nn.Dropout(0.5),
                            nn.Linear(12, 3))
    loss, frozen = build_loss(["kd=1", "jacobian=1", "jacobian-direction=1"]), teacher()
    before = {k: v.clone() for k, v in student.state_dict().items()}
    state = torch.random.get_rng_state()
    probe_terms(loss, student, frozen, x, y, "s")
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert all(p.grad is None for p in student.parameters())


def test_cli_check_refuses_before_anything_runs(capsys, monkeypatch):
    """Through `jacplug check`, with a student registered by an in-process plugin."""
    from jacplug import hookimpl
    from jacplug.cli.main import main
    from jacplug.registry import get_host

    class Plugin:
        @hookimpl
        def register_models(self, register):
            register("raw-hardsigmoid-net", lambda num_classes, in_chans, pretrained=False, **kw: nn.Sequential(
                nn.Conv2d(in_chans, 4, 3, padding=1), RawHardSigmoid(), nn.Flatten(), nn.Linear(4 * 16 * 16, num_classes)))

    host = get_host()
    plugin = Plugin()
    host.register(plugin, name="raw-hardsigmoid")
    try:
        code = main(["check", "--teacher", "resnet10t", "--student", "raw-hardsigmoid-net"])
    finally:
        host.unregister("raw-hardsigmoid")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1
    assert "aten::hardsigmoid_backward has no derivative in module 1 (RawHardSigmoid)" in err
