"""The teacher: loaded from a checkpoint, or trained (from timm's pretrained weights or from scratch).

Order of precedence: the run directory's own ``teacher.safetensors`` when resuming; then
``--teacher-checkpoint PATH`` (checked against the model name, class count, input channels and
constructor kwargs; without ``--teacher-kwargs`` the teacher is built with the kwargs the checkpoint records);
otherwise the teacher is trained with cross-entropy for ``--teacher-epochs`` (AdamW, cosine
schedule, the student's batch size), starting from timm's pretrained weights with ``--pretrained``
(the classifier is re-initialised for the dataset's classes, so it is fine-tuned, never used
as is) or from scratch, and saved as ``teacher.safetensors``.

Under DDP rank 0 trains the teacher while the other ranks wait, then every rank loads the file;
for long teacher training, train it once in a single process and pass ``--teacher-checkpoint``.
The returned teacher is frozen: eval mode, ``requires_grad_(False)``.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from ..errors import UserError
from .checkpoint import checkpoint_model_kwargs, load_model, save_model
from .config import TrainConfig
from .data import DatasetSplits
from .device import Runtime, barrier
from .evaluate import accuracy
from .metrics import MetricsLog
from .models import BuiltModel, build
from .optim import create_adamw
from .progress import progress

TEACHER_FILE = "teacher.safetensors"


def build_model(
    name: str, splits: DatasetSplits, pretrained: bool = False, *, kwargs: dict | None = None, role: str = "model"
) -> nn.Module:
    """A registered model sized for ``splits``, checked to run at their input size (see :func:`.models.build`)."""
    return build(role, name, splits, kwargs, pretrained=pretrained).module


def teacher_kwargs(config: TrainConfig, run_dir: Path | None = None) -> dict:
    """The teacher's constructor kwargs: ``--teacher-kwargs``, or, when none are given and the teacher
    comes from ``--teacher-checkpoint``, the kwargs that checkpoint records (so it rebuilds the same model)."""
    resuming_own = config.resume and run_dir is not None and (run_dir / TEACHER_FILE).is_file()
    if config.teacher_kwargs or not config.teacher_checkpoint or resuming_own:
        return dict(config.teacher_kwargs)
    return checkpoint_model_kwargs(config.teacher_checkpoint) or {}


def build_teacher(config: TrainConfig, splits: DatasetSplits, run_dir: Path | None = None,
                  pretrained: bool = False) -> BuiltModel:
    return build("teacher", config.teacher, splits, teacher_kwargs(config, run_dir), pretrained=pretrained)


def cosine_schedule(optimizer: torch.optim.Optimizer, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Cosine decay from the base learning rate to zero over ``total_steps`` (JSON-serialisable state)."""
    total = max(total_steps, 1)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total)))


def train_teacher(
    model: nn.Module, splits: DatasetSplits, config: TrainConfig, runtime: Runtime, log: MetricsLog, show: bool
) -> None:
    """Cross-entropy training on the full training split (the teacher is trained on all of it even
    when ``--samples-per-class`` restricts the student's data: the paper's regime is a strong teacher
    and a data-starved student)."""
    generator = torch.Generator().manual_seed(config.seed)
    loader = DataLoader(splits.train, batch_size=config.batch_size, shuffle=True, generator=generator,
                        drop_last=len(splits.train) > config.batch_size, num_workers=config.workers)
    optimizer = create_adamw({"teacher": model}, lr=config.teacher_lr, weight_decay=config.weight_decay)
    scheduler = cosine_schedule(optimizer, config.teacher_epochs * len(loader))
    start = time.perf_counter()
    for epoch in range(1, config.teacher_epochs + 1):
        model.train()
        total, count = 0.0, 0
        for inputs, targets in progress(loader, desc=f"teacher {epoch}/{config.teacher_epochs}", show=show):
            inputs, targets = inputs.to(runtime.device), targets.to(runtime.device)
            if runtime.channels_last:
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            with runtime.autocast():
                loss = F.cross_entropy(model(inputs).float(), targets)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            total, count = total + float(loss.detach()) * len(targets), count + len(targets)
        record = {"kind": "teacher_epoch", "epoch": epoch, "train_loss": total / max(count, 1),
                  "time_s": round(time.perf_counter() - start, 3)}
        if splits.val is not None:
            record["val_acc"] = accuracy(model, splits.val, runtime, batch_size=config.eval_batch_size, show=show,
                                         desc="teacher val")
        log.write(record)


def prepare_teacher(
    config: TrainConfig,
    splits: DatasetSplits,
    runtime: Runtime,
    run_dir: Path,
    log: MetricsLog,
    show: bool,
) -> tuple[nn.Module, str]:
    """A frozen teacher on the run's device, and where its weights came from (for the summary).

    ``splits`` are the full splits (not the ``--samples-per-class`` subset)."""
    own = run_dir / TEACHER_FILE
    built: BuiltModel
    if config.resume and own.is_file():
        built, source = build_teacher(config, splits, run_dir), f"{own} (resumed)"
        load_model(own, built.module, expected_name=config.teacher, num_classes=splits.num_classes,
                   in_chans=splits.in_chans, model_kwargs=built.kwargs)
    elif config.teacher_checkpoint:
        built, source = build_teacher(config, splits, run_dir), config.teacher_checkpoint
        load_model(config.teacher_checkpoint, built.module, expected_name=config.teacher,
                   num_classes=splits.num_classes, in_chans=splits.in_chans, model_kwargs=built.kwargs)
    else:
        if config.teacher_epochs <= 0:
            raise UserError(
                "--teacher-epochs must be positive when the teacher is trained here (no --teacher-checkpoint); "
                "an untrained teacher would teach noise"
            )
        if runtime.is_main:
            built = build_teacher(config, splits, run_dir, pretrained=config.pretrained)
            model = built.module.to(runtime.device)
            if runtime.channels_last:
                model = model.to(memory_format=torch.channels_last)
            train_teacher(model, splits, config, runtime, log, show)
            save_model(own, model, role="teacher", name=config.teacher, num_classes=splits.num_classes,
                       input_shape=splits.input_shape, mean=splits.mean, std=splits.std, config=config.to_dict(),
                       model_kwargs=built.kwargs)
        barrier(runtime)
        built, source = build_teacher(config, splits, run_dir), f"{own} (trained here, {config.teacher_epochs} epochs)"
        load_model(own, built.module)
    model = built.module.to(runtime.device)
    if runtime.channels_last:
        model = model.to(memory_format=torch.channels_last)
    model.eval().requires_grad_(False)
    return model, source
