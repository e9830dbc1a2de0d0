"""Run a torchdistill YAML config through torchdistill's own boxes and training steps.

Why this exists: torchdistill ships its runner only as an example script in its repository (not in
the wheel). This is the same procedure, built from torchdistill's public pieces: its YAML loader
(``!import_call`` and friends), ``dependencies:`` import, model registry, ``get_training_box`` /
``get_distillation_box`` and their ``pre_epoch_process`` / ``forward_process`` /
``post_forward_process`` / ``post_epoch_process`` steps. One addition: an optional
``teacher_train:`` section (a torchdistill training config) trains the teacher with a
``TrainingBox`` first, so a sample needs no pre-trained checkpoint (and no pickle: torchdistill's
``src_ckpt`` loader unpickles, so use it only with files you made yourself).

    python -m jacplug_plugins.torchdistill_run --config docs/examples/torchdistill_digits.yaml --device cpu
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

StepHook = Callable[[Any, int, torch.Tensor], None]
logger = logging.getLogger(__name__)


def load_config(path: str | Path) -> dict:
    """Load a torchdistill YAML config and import its ``dependencies:`` (and the bridge)."""
    from torchdistill.common.main_util import import_dependencies
    from torchdistill.common.yaml_util import load_yaml_file

    from .torchdistill_bridge import register_with_torchdistill

    register_with_torchdistill()
    config = load_yaml_file(str(Path(path).expanduser()))
    import_dependencies(config.get("dependencies"))
    return config


def build_model(model_config: dict, device: torch.device) -> nn.Module:
    """A model from torchdistill's model registry (``key``/``kwargs``), as the example script builds it."""
    from torchdistill.models.registry import get_model

    return get_model(model_config["key"], **(model_config.get("kwargs") or {})).to(device)


def run_box(box: Any, device: torch.device, max_steps: int | None = None, on_step: StepHook | None = None) -> int:
    """torchdistill's epoch/step protocol for a training or distillation box; returns the steps run.

    ``max_steps`` stops early (for smoke tests); ``on_step(box, step, loss)`` runs after each step.
    """
    step = 0
    for epoch in range(box.num_epochs):
        box.pre_epoch_process(epoch=epoch)
        total, count = 0.0, 0
        for sample_batch, targets, supp_dict in box.train_data_loader:
            loss = box.forward_process(sample_batch.to(device), targets.to(device), supp_dict)
            box.post_forward_process(loss=loss)
            step += 1
            total, count = total + float(loss.detach()), count + 1
            if on_step is not None:
                on_step(box, step, loss.detach())
            if max_steps is not None and step >= max_steps:
                break
        box.post_epoch_process()
        logger.info("%s epoch %d: mean loss %.4f over %d steps", type(box).__name__, epoch + 1, total / max(count, 1), count)
        if max_steps is not None and step >= max_steps:
            break
    return step


@torch.no_grad()
def accuracy(model: nn.Module, dataset: Any, loader_config: dict, device: torch.device) -> float:
    """Top-1 accuracy (%) of ``model`` in eval mode on ``dataset``, with a torchdistill data loader."""
    from torchdistill.datasets.util import build_data_loader

    loader = build_data_loader(dataset, loader_config, distributed=False)
    was_training = model.training
    model.eval()
    correct = total = 0
    for images, labels in loader:
        predictions = model(images.to(device)).argmax(dim=1)
        correct += int((predictions == labels.to(device)).sum())
        total += labels.numel()
    model.train(was_training)
    return 100.0 * correct / max(total, 1)


def run(config: dict, device: str = "cpu", max_steps: int | None = None, on_step: StepHook | None = None) -> dict:
    """Train the teacher (if ``teacher_train:``), distil the student (``train:``), then evaluate
    both on ``test.test_data_loader``; returns ``{"teacher_acc", "student_acc", "steps"}``."""
    from torchdistill.core.distillation import get_distillation_box
    from torchdistill.core.training import get_training_box

    dev = torch.device(device)
    datasets = config["datasets"]
    teacher = build_model(config["models"]["teacher_model"], dev)
    student = build_model(config["models"]["student_model"], dev)
    if "teacher_train" in config:
        teacher_box = get_training_box(teacher, datasets, config["teacher_train"], dev, None, False, 1)
        run_box(teacher_box, dev, max_steps)
        teacher_box.clean_modules()
    box = get_distillation_box(teacher, student, datasets, config["train"], dev, None, False, 1)
    steps = run_box(box, dev, max_steps, on_step)
    box.clean_modules()
    summary: dict[str, Any] = {"steps": steps}
    test = config.get("test", {}).get("test_data_loader")
    if test is not None:
        summary["teacher_acc"] = accuracy(teacher, datasets[test["dataset_id"]], test, dev)
        summary["student_acc"] = accuracy(student, datasets[test["dataset_id"]], test, dev)
    destination = config["models"]["student_model"].get("dst_ckpt")
    if destination:
        save_weights(student, Path(destination))
        summary["student_weights"] = destination
    return summary


def save_weights(model: nn.Module, path: Path) -> None:
    """Student weights as safetensors, written to a temporary name and renamed into place."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", required=True, help="torchdistill YAML config")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each training stage after N steps")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.manual_seed(args.seed)
    summary = run(load_config(args.config), args.device, args.max_steps)
    print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in summary.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
