"""Does the student learn the teacher's input gradients, on images it never saw, and is that worth the compute?

A timm ``resnet10t`` teacher, trained briefly on the embedded digits (16 px), is distilled into a ViT
(``vit_tiny_patch16_224`` at 16 px: patches of 4, 2 blocks of width 64) and into a CNN (timm ``test_resnet``) from
10 images per class, by KD alone and by KD + Eq. 10 (Srinivas & Fleuret 2018) with ``jacplug.Distiller``.
For each run: test accuracy and the held-out agreement of the student's input gradients with the
teacher's (:func:`jacplug.agreement.input_gradient_agreement` on 200 test images). A Jacobian step
costs more than a KD step, so KD also runs **at equal compute**: as many steps as fit in the wall time
that KD + Eq. 10 took (from the measured time per KD step), with the same schedule stretched over them.

Usage: ``python benchmarks/agreement.py [--seeds 3] [--steps 100] [--students ViT CNN] [--figure PATH]``; prints a table
(the published one is in docs/results.md). ``--figure`` draws the gradient maps of seed 0's ViT.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from typing import Callable

import timm
import torch
from torch import nn

import jacplug
from jacplug.agreement import gradient_map_figure, gradient_maps, input_gradient_agreement, predicted_classes

#: student -> (factory, Eq. 10 weight, learning rate): the weights chosen on the validation split at 10 images
#: per class in docs/results.md (ViT: lambda = 10; CNN: lambda = 0.3), KD at weight 1
STUDENTS: dict[str, tuple[Callable[[], nn.Module], float, float]] = {
    "ViT": (lambda: timm.create_model("vit_tiny_patch16_224", img_size=16, patch_size=4, depth=2, embed_dim=64,
                                      num_heads=2, in_chans=1, num_classes=10), 10.0, 1e-3),
    "CNN": (lambda: timm.create_model("test_resnet", in_chans=1, num_classes=10), 0.3, 2e-3),
}


def train(model: nn.Module, step: Callable[[torch.optim.Optimizer, torch.Tensor, torch.Tensor], object],
          images: torch.Tensor, labels: torch.Tensor, *, steps: int, batch_size: int, lr: float, seed: int) -> float:
    """AdamW with a cosine schedule over ``steps`` seeded batches; returns the wall time of the steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    start = time.perf_counter()
    for _ in range(steps):
        batch = torch.randperm(len(labels), generator=generator)[:batch_size]
        step(optimizer, images[batch], labels[batch])
        schedule.step()
    return time.perf_counter() - start


def cross_entropy_step(model: nn.Module):
    def step(optimizer, images, labels):
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(images), labels).backward()
        optimizer.step()
    return step


def distill_step(distiller: jacplug.Distiller):
    def step(optimizer, images, labels):
        optimizer.zero_grad()
        distiller.step(optimizer, images, labels)
    return step


@torch.no_grad()
def accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    return float((predicted_classes(model, images) == labels).float().mean())


def few_per_class(labels: torch.Tensor, per_class: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    picks = [torch.nonzero(labels == c).flatten() for c in labels.unique()]
    return torch.cat([p[torch.randperm(len(p), generator=generator)[:per_class]] for p in picks])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=100, help="student steps (KD and KD + Eq. 10)")
    parser.add_argument("--per-class", type=int, default=10)
    parser.add_argument("--teacher-steps", type=int, default=100)
    parser.add_argument("--held-out", type=int, default=200, help="test images the agreement is measured on")
    parser.add_argument("--students", nargs="+", choices=sorted(STUDENTS), default=list(STUDENTS))
    parser.add_argument("--figure", help="write the gradient maps of seed 0's ViT to this PNG")
    args = parser.parse_args()
    began = time.perf_counter()

    data = jacplug.registry.create_dataset("digits")
    train_x, train_y = data.train.images, data.train.labels
    test_x, test_y = data.test.images, data.test.labels
    held_out = test_x[: args.held_out]

    torch.manual_seed(0)
    teacher = timm.create_model("resnet10t", in_chans=1, num_classes=10)
    seconds = train(teacher, cross_entropy_step(teacher), train_x, train_y, steps=args.teacher_steps, batch_size=64,
                    lr=2e-3, seed=0)
    teacher.eval()
    print(f"teacher resnet10t: {accuracy(teacher, test_x, test_y):.1%} test accuracy ({seconds:.0f} s)", flush=True)

    rows: dict[tuple[str, str], list[dict[str, float]]] = {}

    def record(name: str, method: str, result: dict[str, float]) -> None:
        rows.setdefault((name, method), []).append(result)
        print(f"  {name} seed {seed}, {method}: " + ", ".join(f"{k} {v:.3g}" for k, v in result.items()), flush=True)

    for name in args.students:
        factory, weight, lr = STUDENTS[name]
        for seed in range(args.seeds):
            subset = few_per_class(train_y, args.per_class, seed)
            images, labels = train_x[subset], train_y[subset]
            batch = min(32, len(subset))
            torch.manual_seed(seed)
            initial = factory()
            measured = time.perf_counter()
            agreement = input_gradient_agreement(initial, teacher, held_out)
            record(name, "untrained",
                   {**agreement, "acc": accuracy(initial, test_x, test_y), "measure_s": time.perf_counter() - measured})

            runs = {"KD": {"kd": 1.0}, "KD + Eq. 10": {"kd": 1.0, "jacobian": weight}}
            seconds = {}
            for method, loss in runs.items():
                student = factory()
                student.load_state_dict(initial.state_dict())
                distiller = jacplug.Distiller(student, teacher, loss=loss)
                seconds[method] = train(student, distill_step(distiller), images, labels, steps=args.steps,
                                        batch_size=batch, lr=lr, seed=seed)
                record(name, method,
                       {**input_gradient_agreement(student, teacher, held_out), "acc": accuracy(student, test_x, test_y),
                        "train_s": seconds[method], "steps": args.steps})
                if method == "KD + Eq. 10" and args.figure and name == "ViT" and seed == 0:
                    shown = test_x[:8]
                    classes = predicted_classes(teacher, shown)
                    path = gradient_map_figure(shown, gradient_maps(teacher, shown, classes),
                                               gradient_maps(initial, shown, classes),
                                               gradient_maps(student, shown, classes), args.figure,
                                               mean=data.mean, std=data.std)
                    print(f"gradient maps: {path}")

            equal_steps = math.floor(args.steps * seconds["KD + Eq. 10"] / seconds["KD"])
            student = factory()
            student.load_state_dict(initial.state_dict())
            distiller = jacplug.Distiller(student, teacher, loss=runs["KD"])
            spent = train(student, distill_step(distiller), images, labels, steps=equal_steps, batch_size=batch,
                          lr=lr, seed=seed)
            record(name, "KD, equal time",
                   {**input_gradient_agreement(student, teacher, held_out), "acc": accuracy(student, test_x, test_y),
                    "train_s": spent, "steps": equal_steps})

    print(f"\n{args.per_class} images per class, {args.steps} steps, seeds 0-{args.seeds - 1}; mean ± std over seeds; "
          f"agreement on {len(held_out)} test images (teacher's top-1 class)\n")
    print("| student | method | steps | train time (s) | test accuracy (%) | agreement cosine | agreement distance (Eq. 10) |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for (name, method), runs in rows.items():
        steps = "0" if method == "untrained" else _mean_std([r["steps"] for r in runs], "{:.0f}")
        train_s = "" if method == "untrained" else _mean_std([r["train_s"] for r in runs], "{:.1f}")
        print(f"| {name} | {method} | {steps} | {train_s} | {_mean_std([100 * r['acc'] for r in runs], '{:.1f}')} | "
              f"{_mean_std([r['agreement_cosine'] for r in runs], '{:.3f}')} | "
              f"{_mean_std([r['agreement_distance'] for r in runs], '{:.3f}')} |")
    measures = [r["measure_s"] for key, runs in rows.items() if key[1] == "untrained" for r in runs]
    print(f"\none agreement measurement ({len(held_out)} images, both models): {min(measures):.2f}-{max(measures):.2f} s; "
          f"total {time.perf_counter() - began:.0f} s")


def _mean_std(values: list[float], fmt: str) -> str:
    if len(values) < 2:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


if __name__ == "__main__":
    main()
