"""FeatureTap and forward_intermediates: on-graph capture, hook lifetime, and every refusal."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import jacplug
from jacplug.errors import UnknownNameError, UserError
from jacplug.features import FeatureTap, FeatureTapError, disable_inplace, forward_intermediates


class Net(nn.Module):
    """conv -> bn -> ReLU(inplace) -> pool -> fc, like a timm stem; ``[B, 1, 6, 6] -> [B, 3]``."""

    def __init__(self, inplace: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.ReLU(inplace=inplace)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        return self.fc(self.pool(self.act(self.bn(self.conv(x)))).flatten(1))


class Shared(nn.Module):
    """Applies the same block twice in one forward."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(3, 3)

    def forward(self, x):
        return self.block(torch.tanh(self.block(x)))


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


@pytest.fixture
def x():
    torch.manual_seed(0)
    return torch.randn(2, 1, 6, 6)


def test_tapped_feature_is_on_graph_and_trains_the_student(x):
    model = Net()
    with FeatureTap(model, ["conv", "act"]) as tap:
        logits = model(x)
        conv, act = tap["conv"], tap["act"]
    assert logits.shape == (2, 3) and conv.shape == (2, 4, 6, 6)
    assert conv.grad_fn is not None and act.grad_fn is not None
    torch.testing.assert_close(act, torch.relu(model.bn(model.conv(x))))
    conv.pow(2).mean().backward()
    assert model.conv.weight.grad is not None and model.conv.weight.grad.abs().sum() > 0
    assert model.fc.weight.grad is None  # the feature loss only reaches layers before the tap


def test_exported_from_package_and_mapping_protocol(x):
    model = Net(inplace=False)
    with jacplug.FeatureTap(model, "bn") as tap:
        assert "bn" not in tap and len(tap) == 0
        model(x)
        assert "bn" in tap and list(tap) == ["bn"] and set(tap.features()) == {"bn"}
    assert tap["bn"] is tap.features()["bn"]  # still readable after the block


def test_hooks_removed_on_exit_and_on_error(x):
    model = Net()
    before = hook_count(model)
    with FeatureTap(model, ["conv"]) as tap:
        assert hook_count(model) == before + 2 and tap.active  # the module hook and the root reset
    assert hook_count(model) == before and not tap.active
    with pytest.raises(ZeroDivisionError):
        with FeatureTap(model, ["conv", "fc"]):
            model(x)
            1 / 0
    assert hook_count(model) == before
    with pytest.raises(FeatureTapError):  # a refusal raised inside a hook, mid-forward
        with torch.no_grad(), FeatureTap(model, ["conv"]):
            model(x)
    assert hook_count(model) == before


def test_captures_reset_at_each_root_forward(x):
    model = Net(inplace=False)
    with FeatureTap(model, ["conv"]) as tap:
        model(x)
        first = tap["conv"]
        model(x[:1])  # a second step: no "ran twice" error, the tap holds the latest forward
        assert tap["conv"].shape[0] == 1 and first.shape[0] == 2
        tap.clear()
        with pytest.raises(FeatureTapError, match="no output since"):
            tap["conv"]


def test_unknown_name_suggests_close_matches():
    with pytest.raises(UnknownNameError, match="did you mean 'conv'") as info:
        FeatureTap(Net(), ["conv", "cnov"])
    assert isinstance(info.value, UserError)
    model = Net()
    with FeatureTap(model, ["conv"]) as tap:
        with pytest.raises(UnknownNameError, match="tapped module 'fc'"):
            tap["fc"]


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
def test_refuses_capture_without_graph(x, mode):
    model = Net()
    with pytest.raises(FeatureTapError, match=r"requires_grad=False"):
        with mode(), FeatureTap(model, ["conv"]):
            model(x)


def test_refuses_output_that_does_not_require_grad(x):
    model = Net().requires_grad_(False)
    with pytest.raises(FeatureTapError, match="does not require grad"):
        with FeatureTap(model, ["conv"]):
            model(x)


def test_frozen_teacher_allowed_with_requires_grad_false(x):
    teacher = Net(inplace=False).eval().requires_grad_(False)
    with torch.no_grad(), FeatureTap(teacher, ["bn"], requires_grad=False) as tap:
        teacher(x)
    assert tap["bn"].grad_fn is None and tap["bn"].shape == (2, 4, 6, 6)
    with torch.inference_mode(), FeatureTap(teacher, ["bn"], requires_grad=False) as tap:
        teacher(x)
    assert tap["bn"].is_inference()


def test_refuses_tensor_modified_in_place_after_capture(x):
    model = Net(inplace=True)  # ReLU(inplace=True) right after the hooked BatchNorm, as in timm
    with FeatureTap(model, ["bn"]) as tap:
        model(x)
        with pytest.raises(FeatureTapError, match=r"modified in place.*disable_inplace"):
            tap["bn"]
    assert disable_inplace(model) == ["act"] and model.act.inplace is False
    with FeatureTap(model, ["bn"]) as tap:
        model(x)
    torch.testing.assert_close(tap["bn"], model.bn(model.conv(x)))  # outside: calling model.bn inside would re-fire


def test_module_firing_twice_refused_unless_keep_all():
    model, x = Shared(), torch.randn(2, 3)
    with pytest.raises(FeatureTapError, match="ran twice.*keep_all=True"):
        with FeatureTap(model, ["block"]):
            model(x)
    with FeatureTap(model, ["block"], keep_all=True) as tap:
        out = model(x)
        first, second = tap["block"]
    torch.testing.assert_close(second, out)
    torch.testing.assert_close(first, model.block(x))


def test_refuses_data_parallel():
    with pytest.raises(FeatureTapError, match="DistributedDataParallel"):
        FeatureTap(nn.DataParallel(Net()), ["conv"])


def test_ddp_model_is_tapped_through_its_module(x, tmp_path):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = nn.parallel.DistributedDataParallel(Net(inplace=False))
        with FeatureTap(model, ["conv"]) as tap:  # names as in the unwrapped model
            model(x)
        assert tap["conv"].shape == (2, 4, 6, 6) and tap["conv"].grad_fn is not None
    finally:
        dist.destroy_process_group()


def test_cannot_reenter_an_active_tap(x):
    tap = FeatureTap(Net(), ["conv"])
    with tap:
        with pytest.raises(FeatureTapError, match="already active"):
            tap.__enter__()


# -- timm forward_intermediates -------------------------------------------------------------------


@pytest.fixture(scope="module")
def resnet():
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    return timm.create_model("resnet18", num_classes=5, pretrained=False).eval()


def test_forward_intermediates_matches_forward_and_tap(resnet):
    x = torch.randn(2, 3, 32, 32)
    logits, feats = forward_intermediates(resnet, x, ["layer3", -1])
    assert set(feats) == {"layer3", "layer4"} and feats["layer3"].shape == (2, 256, 2, 2)
    with FeatureTap(resnet, ["layer3"]) as tap:
        reference = resnet(x)
    torch.testing.assert_close(logits, reference)
    torch.testing.assert_close(feats["layer3"], tap["layer3"])
    assert list(forward_intermediates(resnet, x, "layer2")[1]) == ["layer2"]
    with pytest.raises(UnknownNameError, match="did you mean 'layer3'"):
        forward_intermediates(resnet, x, ["layr3"])
    with pytest.raises(FeatureTapError, match="use FeatureTap"):
        forward_intermediates(Net(), torch.randn(1, 1, 6, 6), ["conv"])


def test_forward_intermediates_works_under_torch_func(resnet):
    x = torch.randn(1, 3, 16, 16)

    def feature_energy(inp):
        _, feats = forward_intermediates(resnet, inp, ["layer1"])
        return feats["layer1"].pow(2).mean()

    grad = torch.func.grad(feature_energy)(x)
    x_ = x.clone().requires_grad_(True)
    (expected,) = torch.autograd.grad(feature_energy(x_), x_)
    torch.testing.assert_close(grad, expected)


def test_timm_inplace_relu_after_bn_is_caught(resnet):
    with FeatureTap(resnet, ["bn1", "act1"]) as tap:
        resnet(torch.randn(1, 3, 16, 16))
        assert tap["act1"].shape == (1, 64, 8, 8)
        with pytest.raises(FeatureTapError, match="'bn1' was modified in place"):
            tap["bn1"]
