"""Top-1 accuracy of a model on a dataset split (eval mode, no grad, the run's autocast)."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .runtime import Runtime
from .progress import progress


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Dataset, runtime: Runtime, *, batch_size: int, show: bool, desc: str) -> float:
    """Fraction of ``dataset`` whose argmax logit equals the label; restores the model's train/eval mode.

    Every rank evaluates the whole split (identical results, so decisions such as "best checkpoint"
    agree across ranks without communication).
    """
    model = getattr(model, "module", model)
    was_training = model.training
    model.eval()
    correct = total = 0
    for inputs, targets in progress(DataLoader(dataset, batch_size=batch_size), desc=desc, show=show):
        inputs = inputs.to(runtime.device, non_blocking=True)
        if runtime.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        with runtime.autocast():
            logits = model(inputs)
        correct += int((logits.argmax(1).cpu() == targets).sum())
        total += len(targets)
    model.train(was_training)
    return correct / max(total, 1)
