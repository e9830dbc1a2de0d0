"""Trains a ``JacobianDistillationTrainer`` on the CPU and saves what was trained.

Run by tests/test_integration_hf.py, once with ``torch.distributed.run --nproc_per_node 2`` (the Trainer
then runs DDP over gloo) and once as one process:

    python tests/scripts/hf_ddp.py OUT BATCH

Each rank writes ``OUT.RANK.safetensors``: the student and the FitNet adapter (float64, SGD, no
BatchNorm) after three optimizer steps over 8 fixed samples in order, ``BATCH`` per process.
The run's logs go to ``OUT.RANK.json`` (``trainer.state.log_history``).
"""

from __future__ import annotations

import json
import os
import sys

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import TrainingArguments

from jacplug.integrations.hf_trainer import JacobianDistillationTrainer
from jacplug.losses import FitNetLoss, JacobianLoss, KDLoss, WeightedLoss


class Images(torch.utils.data.Dataset):
    def __init__(self) -> None:
        g = torch.Generator().manual_seed(1)
        self.x = torch.randn(8, 1, 6, 6, generator=g, dtype=torch.float64)
        self.y = torch.randint(0, 5, (8,), generator=g)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": int(self.y[i])}


def net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, stride=2, padding=1),
                         nn.Softplus(), nn.Flatten(), nn.Linear(4 * 3 * 3, 5)).double()


class Sequential(JacobianDistillationTrainer):
    """The samples in order; the Trainer's accelerate splits each global batch between the ranks, so one
    process with the whole batch sees the same global batches."""

    def _get_train_sampler(self, *args, **kwargs):
        return torch.utils.data.SequentialSampler(self.train_dataset)


def main(out: str, batch: int) -> None:
    torch.manual_seed(0)
    student, teacher = net(), net()
    loss = WeightedLoss({"kd": (KDLoss(), 1.0), "fitnet": (FitNetLoss({"1": "1"}, {"1": (4, 4)}), 1.0),
                         "jacobian": (JacobianLoss(), 10.0)}).double()
    args = TrainingArguments(output_dir=f"{out}.run", per_device_train_batch_size=batch, max_steps=3, learning_rate=0.1,
                             optim="sgd", lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
                             ddp_backend="gloo" if int(os.environ.get("WORLD_SIZE", 1)) > 1 else None,
                             dataloader_num_workers=0, remove_unused_columns=False, dataloader_drop_last=True)
    trainer = Sequential(model=student, teacher_model=teacher, loss=loss, args=args, train_dataset=Images())
    trainer.train()
    state = {**{f"student.{k}": v for k, v in trainer.student_state_dict().items()},
             **{f"loss.{k}": v for k, v in loss.state_dict().items()}}
    rank = int(os.environ.get("RANK", 0))
    save_file({k: v.detach().contiguous() for k, v in state.items()}, f"{out}.{rank}.safetensors")
    with open(f"{out}.{rank}.json", "w") as fh:
        json.dump(trainer.state.log_history, fh)
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
