"""Shared fixtures: small float64 models that exercise the traps (BatchNorm, in-place ReLU)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

torch.set_num_threads(max(1, min(2, torch.get_num_threads())))


def small_convnet(classes: int = 5, channels: int = 2, inplace: bool = True) -> nn.Module:
    """Conv -> BatchNorm -> ReLU(inplace) -> Linear: the pattern timm's resnets use."""
    return nn.Sequential(
        nn.Conv2d(channels, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=inplace),
        nn.Conv2d(4, 3, 3, stride=2, padding=1),
        nn.Tanh(),
        nn.Flatten(),
        nn.Linear(3 * 3 * 3, classes),
    )


def small_mlp(inputs: int = 6, classes: int = 4) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(inputs, 8), nn.Tanh(), nn.Linear(8, classes))


@pytest.fixture
def rng() -> torch.Generator:
    return torch.Generator().manual_seed(1234)


@pytest.fixture
def convnet() -> nn.Module:
    torch.manual_seed(0)
    net = small_convnet().double()
    with torch.no_grad():  # non-trivial BatchNorm statistics so eval mode is not the identity
        net(torch.randn(16, 2, 5, 5, dtype=torch.float64) * 2 + 0.5)
    return net.eval()


def per_sample_reference(net: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Diagonal blocks of torch.autograd.functional.jacobian: ``[B, C, *S]``."""
    full = torch.autograd.functional.jacobian(net, x.detach())
    return torch.stack([full[b, :, b] for b in range(x.shape[0])])
