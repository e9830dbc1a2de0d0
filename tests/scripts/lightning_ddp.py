"""Trains a ``DistillationModule`` with ``lightning.Trainer`` on the CPU and saves what was trained.

Run by tests/test_integration_lightning.py as a script, because Lightning's ``"ddp"`` strategy starts
the other ranks by running the same command again:

    python tests/scripts/lightning_ddp.py OUT DEVICES BATCH

Each rank writes ``OUT.RANK.safetensors``: the module's state (student and FitNet adapter) after three
optimizer steps (float64, SGD) over 8 fixed samples, ``BATCH`` per process.
"""

from __future__ import annotations

import functools
import sys

import lightning as L
import torch
from safetensors.torch import save_file
from torch import nn

from jacplug.integrations.lightning_module import DistillationModule
from jacplug.losses import FitNetLoss, JacobianLoss, KDLoss, WeightedLoss


def net() -> nn.Module:
    """No BatchNorm: train-mode statistics over each rank's shard would differ from the whole batch's."""
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                         nn.Softplus(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5)).double()


def main(out: str, devices: int, batch: int) -> None:
    torch.manual_seed(0)
    student, teacher = net(), net()
    loss = WeightedLoss({"kd": (KDLoss(), 1.0), "fitnet": (FitNetLoss({"1": "1"}, {"1": (4, 4)}), 1.0),
                         "jacobian": (JacobianLoss(), 10.0)}).double()
    module = DistillationModule(student, teacher, loss, optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    g = torch.Generator().manual_seed(1)
    data = torch.utils.data.TensorDataset(torch.randn(8, 1, 6, 6, generator=g, dtype=torch.float64),
                                          torch.randint(0, 5, (8,), generator=g))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        precision="64-true", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=batch))
    state = {k: v.detach().contiguous() for k, v in module.state_dict().items()}
    save_file(state, f"{out}.{trainer.global_rank}.safetensors")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
