"""Run a torchdistill YAML config the way torchdistill's image-classification example script does.

Why this exists: torchdistill ships that script (``examples/torchvision/image_classification.py``)
only in its repository, not in the wheel. This runner follows the same procedure with
torchdistill's public pieces (its YAML loader with ``!import_call``, ``dependencies:``, its model
registry, ``get_training_box`` / ``get_distillation_box`` and their ``pre_epoch_process`` /
``forward_process`` / ``post_forward_process`` / ``post_epoch_process`` steps): each epoch it trains,
measures the student's top-1 accuracy on ``train.val_data_loader``, keeps the best student in
``models.student_model.dst_ckpt``, then steps the epoch-wise scheduler (``ReduceLROnPlateau`` gets
its metric, see :func:`~jacplug.integrations.torchdistill.epoch.plateau_metric`); at the end it loads the
best student back and tests both models on ``test.test_data_loader``.

Two differences, both for safety or convenience: checkpoints are safetensors (weights only, written
atomically; torchdistill's script pickles a dict with ``torch.save``), and an optional
``teacher_train:`` section (a torchdistill training config) trains the teacher with a
``TrainingBox`` first, so a sample needs no pre-trained teacher.

    python -m jacplug.integrations.torchdistill.run --config docs/examples/torchdistill_digits.yaml --device cpu
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ...errors import UserError

StepHook = Callable[[Any, int, torch.Tensor], None]
logger = logging.getLogger(__name__)


def load_config(path: str | Path) -> dict:
    """Load a torchdistill YAML config and import its ``dependencies:`` (and the bridge)."""
    from torchdistill.common.main_util import import_dependencies
    from torchdistill.common.yaml_util import load_yaml_file

    from .registration import register_with_torchdistill

    register_with_torchdistill()
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"torchdistill config {str(path)!r} does not exist")
    config = load_yaml_file(str(path))
    import_dependencies(config.get("dependencies"))
    return config


def build_model(model_config: dict, device: torch.device) -> nn.Module:
    """A model from torchdistill's model registry (``key``/``kwargs``), as the example script builds it."""
    from torchdistill.models.registry import get_model

    return get_model(model_config["key"], **(model_config.get("kwargs") or {})).to(device)


def train_box(
    box: Any,
    device: torch.device,
    *,
    max_steps: int | None = None,
    on_step: StepHook | None = None,
    best_path: Path | None = None,
) -> dict[str, Any]:
    """torchdistill's epoch protocol for a training or distillation box, as its example script runs it.

    Per epoch: ``pre_epoch_process``, then ``forward_process`` / ``post_forward_process`` per batch,
    then (with a ``val_data_loader``) the trained model's validation top-1 accuracy, saving the model
    to ``best_path`` when it improves, then ``post_epoch_process``. ``max_steps`` stops early (smoke
    tests); ``on_step(box, step, loss)`` runs after each step. Returns ``{"steps", "best_val_acc",
    "best_epoch"}`` (the last two ``None`` without a validation loader).
    """
    from .epoch import trained_model, plateau_metric, top1_accuracy

    model = trained_model(box)
    summary: dict[str, Any] = {"steps": 0, "best_val_acc": None, "best_epoch": None}
    for epoch in range(box.num_epochs):
        box.pre_epoch_process(epoch=epoch)
        total, count = 0.0, 0
        for sample_batch, targets, supp_dict in box.train_data_loader:
            loss = box.forward_process(sample_batch.to(device), targets.to(device), supp_dict)
            box.post_forward_process(loss=loss)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"{type(box).__name__} epoch {epoch}: the loss became {value}")
            summary["steps"] += 1
            total, count = total + value, count + 1
            if on_step is not None:
                on_step(box, summary["steps"], loss.detach())
            if max_steps is not None and summary["steps"] >= max_steps:
                break
        message = f"{type(box).__name__} epoch {epoch}: mean loss {total / max(count, 1):.4f} over {count} steps"
        val_acc = None
        if box.val_data_loader is not None:
            val_acc = top1_accuracy(model, box.val_data_loader, device)
            message += f", validation top-1 {val_acc:.2f}%"
            if summary["best_val_acc"] is None or val_acc > summary["best_val_acc"]:
                summary["best_val_acc"], summary["best_epoch"] = val_acc, epoch
                if best_path is not None:
                    save_weights(model, best_path, {"val_top1": f"{val_acc:.4f}", "epoch": str(epoch)})
                    message += f" (best; saved {best_path})"
        logger.info(message)
        box.post_epoch_process(metrics=plateau_metric(box, val_acc))
        if max_steps is not None and summary["steps"] >= max_steps:
            break
    return summary


def run(config: dict, device: str = "cpu", max_steps: int | None = None, on_step: StepHook | None = None) -> dict:
    """Train the teacher (if ``teacher_train:``), distil the student (``train:``), keep the best
    student by validation accuracy, then test both on ``test.test_data_loader``.

    Returns ``{"steps", "best_val_acc", "best_epoch", "teacher_acc", "student_acc", "student_weights"}``
    (entries that do not apply are left out).
    """
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.core.training import get_training_box
    from torchdistill.datasets.util import build_data_loader

    from .epoch import top1_accuracy

    dev = torch.device(device)
    datasets = config["datasets"]
    teacher = build_model(config["models"]["teacher_model"], dev)
    student = build_model(config["models"]["student_model"], dev)
    if "teacher_train" in config:
        teacher_box = get_training_box(teacher, datasets, config["teacher_train"], dev, None, False, 1)
        train_box(teacher_box, dev, max_steps=max_steps)
        teacher_box.clean_modules()
    destination = config["models"]["student_model"].get("dst_ckpt")
    best_path = Path(destination) if destination else None
    box = get_distillation_box(teacher, student, datasets, config["train"], dev, None, False, 1)
    trained = train_box(box, dev, max_steps=max_steps, on_step=on_step, best_path=best_path)
    summary = {k: v for k, v in trained.items() if v is not None}
    box.clean_modules()
    if best_path is not None:
        if "best_val_acc" in summary:
            load_weights(student, best_path)  # test the best student, as torchdistill's script does
        else:
            save_weights(student, best_path, {})
        summary["student_weights"] = str(best_path)
    test = config.get("test", {}).get("test_data_loader")
    if test is not None:
        loader = build_data_loader(datasets[test["dataset_id"]], test, distributed=False)
        summary["teacher_acc"] = top1_accuracy(teacher, loader, dev)
        summary["student_acc"] = top1_accuracy(student, loader, dev)
    return summary


def save_weights(model: nn.Module, path: Path, metadata: dict[str, str]) -> None:
    """Weights as safetensors (string ``metadata``), written to a temporary name and renamed into place."""
    from safetensors.torch import save

    from jacplug.io.files import atomic_write_bytes

    state = {k: v.detach().contiguous().cpu() for k, v in getattr(model, "module", model).state_dict().items()}
    atomic_write_bytes(path, save(state, metadata=metadata))


def load_weights(model: nn.Module, path: Path) -> None:
    from safetensors.torch import load_file

    getattr(model, "module", model).load_state_dict(load_file(str(path)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="torchdistill YAML config")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each training stage after N steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    try:
        summary = run(load_config(args.config), args.device, args.max_steps)
    except UserError as exc:
        print(f"jacplug: error: {exc}", file=sys.stderr)
        return 2
    print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
