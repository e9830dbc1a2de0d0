"""The optimizer: weight decay on weight matrices and kernels only, never on norm parameters or biases."""

from __future__ import annotations

import torch
from torch import nn

from jacplug.losses import FitNetLoss, KDLoss, WeightedLoss
from jacplug.training.optim import create_adamw


class WithToken(nn.Module):
    """A model that, like timm's ViTs, names a 2-d parameter that must not be decayed."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.zeros(1, 4))
        self.head = nn.Linear(4, 2)

    def no_weight_decay(self) -> set[str]:
        return {"token"}


def decay_of(optimizer: torch.optim.Optimizer) -> dict[int, float]:
    return {id(p): group["weight_decay"] for group in optimizer.param_groups for p in group["params"]}


def test_norm_and_bias_parameters_get_no_weight_decay(tiny_resnet):
    student = tiny_resnet()
    loss = WeightedLoss({"kd": (KDLoss(), 1.0), "fitnet": (FitNetLoss({"layer1": "layer1"}, {"layer1": (32, 32)}), 1.0)})
    student.fc.weight.requires_grad_(False)  # frozen parameters stay out of the optimizer
    optimizer = create_adamw({"student": student, "loss": loss}, lr=1e-3, weight_decay=0.05)
    decay = decay_of(optimizer)
    named = dict(student.named_parameters())
    norms = [n for n, m in student.named_modules() if isinstance(m, nn.BatchNorm2d)]
    assert norms and all(decay[id(named[f"{n}.{p}"])] == 0.0 for n in norms for p in ("weight", "bias"))
    assert decay[id(student.fc.bias)] == 0.0 and id(student.fc.weight) not in decay
    assert decay[id(student.layer1[0].conv1.weight)] == 0.05 and decay[id(loss.terms["fitnet"].adapters[0].weight)] == 0.05
    trainable = [p for p in list(student.parameters()) + list(loss.parameters()) if p.requires_grad]
    assert sorted(decay) == sorted(id(p) for p in trainable)


def test_a_models_no_weight_decay_names_are_honoured():
    model = WithToken()
    decay = decay_of(create_adamw({"student": model}, lr=1e-3, weight_decay=0.1))
    assert decay == {id(model.token): 0.0, id(model.head.bias): 0.0, id(model.head.weight): 0.1}
