"""Does the Jacobian term pay for its compute? Accuracy and agreement against wall time and FLOPs, to the plateau.

A KD + Eq. 10 step (Srinivas & Fleuret 2018) costs more than a KD step, so a comparison at equal steps
flatters it. Here every method trains until its validation accuracy stops rising, and every evaluation
records the compute spent so far, so each method can be read at any budget:

- students: the results page's ViT (timm ``test_vit``, patches of 4 at 16 px) and CNN (timm ``test_resnet``),
  from scratch, at 5 and 10 images per class of the embedded digits, 3 seeds; the teacher is the
  few-sample experiment's (timm ``resnet10t``, trained on every training image, or ``--teacher-checkpoint``);
- methods: CE (labels only), KD (``kd=1:temperature=4``), and KD + Eq. 10 at the weight chosen on the
  validation split on the results page (``jacobian=λ``);
- AdamW at a **constant** learning rate (a cosine needs the budget in advance; a run that is to find its
  own end cannot have one), the optimizer and batch sizes of the results page;
- every ``--eval-every`` steps: validation and test accuracy, the held-out agreement of the student's
  input gradients with the teacher's on the first 200 test images (:mod:`jacplug.agreement`), the
  training time so far (the steps only, not the evaluations), and the FLOPs so far;
- a run stops at its **plateau**: once it has run ``--min-steps``, when the best validation accuracy of
  the last third of its steps is less than ``--min-gain`` points above the best before it; or at
  ``--max-steps``.

FLOPs are counted, not estimated: one training step of each run is replayed on a copy of the student
under ``torch.utils.flop_counter.FlopCounterMode`` (matrix products, convolutions and attention, forward,
backward and the double backward of the Jacobian term; elementwise operations are not counted), and a
step's count is the same at every step (full batches of a fixed size). So the FLOP axis does not depend
on the machine's load, and the time axis can be checked against it.

Usage: ``python benchmarks/plateau.py [--out runs/plateau] [--seeds 3] [--students ViT CNN]``. Resumable:
each finished run is written to ``OUT/runs/`` the moment it ends and is not run again; an interrupted run
starts over. The published run and its reading are in docs/results.md.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import multiprocessing
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

import jacplug
from jacplug.agreement import agreement_with, gradient_map_figure, gradient_maps, predicted_classes, teacher_reference
from jacplug.data.datasets import few_sample_subset
from jacplug.experiment.config import ExperimentConfig
from jacplug.experiment.protocol import hardware, load_teacher, teacher_weights
from jacplug.io.files import atomic_write_text
from jacplug.models.build import build_model
from jacplug.training.optim import create_adamw
from jacplug.training.prepare import load_data
from jacplug.training.runtime import init_runtime


@dataclasses.dataclass(frozen=True)
class Student:
    """A student of the results page: its timm name and arguments, its learning rate and batch size there, and
    the Eq. 10 weight chosen on its validation split there."""

    model: str
    kwargs: dict[str, Any]
    lr: float
    batch_size: int
    jacobian_weight: float
    eval_every: int
    min_steps: int
    max_steps: int


STUDENTS = {
    "ViT": Student("test_vit", {"patch_size": 4}, lr=1e-3, batch_size=64, jacobian_weight=10.0,
                   eval_every=50, min_steps=1500, max_steps=6000),
    "CNN": Student("test_resnet", {}, lr=2e-3, batch_size=32, jacobian_weight=3.0,
                   eval_every=25, min_steps=750, max_steps=3000),
}
METHODS = ("ce", "kd", "kd+jacobian")
LABELS = {"ce": "CE (labels only)", "kd": "KD", "kd+jacobian": "KD + Eq. 10"}
HELD_OUT = 200  # test images the agreement is measured on
FIGURE_RUN = ("ViT", "kd+jacobian", 10, 0)  # the run whose gradient maps --figure draws


@dataclasses.dataclass(frozen=True)
class Run:
    student: str
    method: str
    per_class: int
    seed: int

    @property
    def name(self) -> str:
        return f"{self.student}-{self.method}-n{self.per_class}-seed{self.seed}"


def loss_specs(run: Run, student: Student, temperature: float) -> list[str]:
    kd = f"kd=1:temperature={temperature:g}"
    return {"ce": ["ce=1"], "kd": [kd], "kd+jacobian": [kd, f"jacobian={student.jacobian_weight:g}"]}[run.method]


def plateaued(curve: list[dict[str, Any]], min_steps: int, min_gain: float) -> bool:
    """Whether the best validation accuracy of the last third of the steps run is less than ``min_gain`` points
    above the best before it (only from ``min_steps`` on)."""
    step = curve[-1]["step"]
    if step < min_steps:
        return False
    earlier = [p["val_acc"] for p in curve if p["step"] <= 2 * step / 3]
    later = [p["val_acc"] for p in curve if p["step"] > 2 * step / 3]
    return 100 * (max(later) - max(earlier)) < min_gain


def batch_stream(count: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Full batches cut from consecutive seeded permutations: every image is seen equally often (within one)."""
    generator = torch.Generator().manual_seed(seed)
    pending = torch.empty(0, dtype=torch.long)
    while True:
        while len(pending) < batch_size:
            pending = torch.cat([pending, torch.randperm(count, generator=generator)])
        yield pending[:batch_size]
        pending = pending[batch_size:]


# ---------------------------------------------------------------------------------------------------
# one run, in a worker process


_WORKER: dict[str, Any] = {}


def _init_worker(teacher_path: str, threads: int) -> None:
    torch.set_num_threads(threads)
    config = ExperimentConfig(out=str(Path(teacher_path).parent))
    runtime = init_runtime("cpu")
    full = load_data(config)
    teacher = load_teacher(config, full, Path(teacher_path), runtime)
    test_images = torch.stack([full.test[i][0] for i in range(len(full.test))])
    _WORKER.update(config=config, full=full, teacher=teacher,
                   reference=teacher_reference(teacher, test_images[:HELD_OUT]))


def _split_tensors(split) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.stack([split[i][0] for i in range(len(split))]),
            torch.tensor([int(split[i][1]) for i in range(len(split))]))


@torch.no_grad()
def _accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    correct = float((model(images).argmax(1) == labels).float().mean())
    model.train(was_training)
    return correct


def train_run(run: Run, options: dict[str, Any]) -> dict[str, Any]:
    """Train one student to its plateau and return its record (the curve and what it cost)."""
    config, full, teacher = _WORKER["config"], _WORKER["full"], _WORKER["teacher"]
    student_spec = Student(**options["students"][run.student])  # the parent's, with its --jacobian-weights
    splits = few_sample_subset(full, run.per_class, run.seed)
    images, labels = _split_tensors(splits.train)
    evaluated = {name: _split_tensors(getattr(splits, name)) for name in ("val", "test")}
    batch_size = min(student_spec.batch_size, len(labels))
    torch.manual_seed(run.seed)
    student = build_model("student", student_spec.model, splits, dict(student_spec.kwargs)).module
    specs = loss_specs(run, student_spec, config.temperature)
    lr = student_spec.lr
    batches = batch_stream(len(labels), batch_size, run.seed)

    def step_of(model: nn.Module):
        optimizer = create_adamw({"student": model}, lr=lr, weight_decay=config.weight_decay)
        if run.method == "ce":  # no teacher: its forward pass would count against CE's compute

            def step(batch: torch.Tensor) -> dict[str, torch.Tensor]:
                optimizer.zero_grad(set_to_none=True)
                loss = nn.functional.cross_entropy(model(images[batch]), labels[batch])
                loss.backward()
                optimizer.step()
                return {"ce": loss.detach()}
            return step
        distiller = jacplug.Distiller(model, teacher, loss=specs)

        def step(batch: torch.Tensor) -> dict[str, torch.Tensor]:
            optimizer.zero_grad(set_to_none=True)
            return distiller.step(optimizer, images[batch], labels[batch])
        return step

    flops_per_step = count_step_flops(step_of(copy.deepcopy(student)), batch_stream(len(labels), batch_size, run.seed))
    step = step_of(student)

    def point(steps: int, train_s: float) -> dict[str, Any]:
        return {"step": steps, "train_s": round(train_s, 3), "flops": steps * flops_per_step,
                **{f"{name}_acc": _accuracy(student, *evaluated[name]) for name in evaluated},
                **agreement_with(student, _WORKER["reference"])}

    initial = copy.deepcopy(student)
    limits = options_for(run, options)
    curve = [point(0, 0.0)]
    train_s, done, diverged = 0.0, 0, False
    started = time.perf_counter()
    while done < limits["max_steps"]:
        began = time.perf_counter()
        for _ in range(student_spec.eval_every):
            values = step(next(batches))
        train_s += time.perf_counter() - began
        done += student_spec.eval_every
        curve.append(point(done, train_s))
        diverged = not all(math.isfinite(float(v)) for k, v in values.items() if k != "output")
        if diverged or plateaued(curve, limits["min_steps"], options["min_gain"]):
            break
    if options["figure"] and (run.student, run.method, run.per_class, run.seed) == FIGURE_RUN:
        shown = evaluated["test"][0][:8]
        classes = predicted_classes(teacher, shown)
        gradient_map_figure(shown, gradient_maps(teacher, shown, classes), gradient_maps(initial, shown, classes),
                            gradient_maps(student, shown, classes), options["figure"], mean=full.mean, std=full.std)
    return {**dataclasses.asdict(run), "loss": specs, "lr": lr, "batch_size": batch_size,
            "train_samples": len(labels), "flops_per_step": flops_per_step,
            "plateaued": plateaued(curve, limits["min_steps"], options["min_gain"]), "diverged": diverged,
            "steps": done, "train_s": round(train_s, 3), "time_s": round(time.perf_counter() - started, 3),
            "load_average": os.getloadavg(), "curve": curve}


def options_for(run: Run, options: dict[str, Any]) -> dict[str, int]:
    """The run's ``min_steps`` and ``max_steps``: its student's, or ``--max-steps``."""
    spec = options["students"][run.student]
    return {"min_steps": spec["min_steps"], "max_steps": options.get("max_steps") or spec["max_steps"]}


class _NoModules:
    """Stands in for FlopCounterMode's per-module tracker: its module hooks cannot run inside the
    ``torch.autograd.grad`` of an input that the Jacobian terms take, and only the total is wanted here."""

    parents = ("Global",)

    def __enter__(self) -> "_NoModules":
        return self

    def __exit__(self, *exc: object) -> None:
        return None


class TotalFlopCounter(FlopCounterMode):
    """``FlopCounterMode`` counting the total only (no per-module table)."""

    def __init__(self) -> None:
        super().__init__(display=False)
        self.mod_tracker = _NoModules()


def count_step_flops(step, batches: Iterator[torch.Tensor]) -> int:
    """FLOPs of one training step (matrix products, convolutions, attention; forward, backward and double
    backward), counted on the given step's own copy of the student. The second step is counted: the first
    call of a :class:`jacplug.Distiller` also checks its inputs and gradient flow, once. The global RNG is left
    as it was."""
    with torch.random.fork_rng(devices=[]):
        step(next(batches))
        with TotalFlopCounter() as counter:
            step(next(batches))
    return int(counter.get_total_flops())


def _run_in_worker(job: tuple[Run, dict[str, Any]]) -> dict[str, Any]:
    return train_run(*job)


# ---------------------------------------------------------------------------------------------------
# summary


def plateau_of(record: dict[str, Any]) -> dict[str, float]:
    """A run's plateau (mean test accuracy and agreement over the evaluations of its last third) and the compute
    at which it got there (its first evaluation whose validation accuracy was within ``1`` point of its best)."""
    curve = record["curve"]
    last = [p for p in curve if p["step"] > 2 * curve[-1]["step"] / 3]
    best_val = max(p["val_acc"] for p in curve)
    reached = next(p for p in curve if p["val_acc"] >= best_val - 0.01)
    return {"test_acc": statistics.fmean(p["test_acc"] for p in last),
            "agreement_cosine": statistics.fmean(p["agreement_cosine"] for p in last),
            "best_test_acc": max(p["test_acc"] for p in curve),
            "reached_step": reached["step"], "reached_s": reached["train_s"], "reached_flops": reached["flops"],
            "stop_step": curve[-1]["step"], "stop_s": curve[-1]["train_s"], "stop_flops": curve[-1]["flops"],
            "step_ms": 1000 * curve[-1]["train_s"] / max(curve[-1]["step"], 1)}


def _mean_std(values: list[float], fmt: str) -> str:
    if len(values) < 2:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ± {fmt.format(statistics.stdev(values))}"


def summary_table(records: list[dict[str, Any]]) -> str:
    groups: dict[tuple[str, int, str], list[dict[str, float]]] = {}
    for record in records:
        key = (record["student"], record["per_class"], record["method"])
        groups.setdefault(key, []).append({**plateau_of(record), "flops_per_step": record["flops_per_step"],
                                           "plateaued": record["plateaued"]})
    lines = ["| student | images / class | method | plateau test acc. (%) | best test acc. (%) | agreement cosine | "
             "steps to plateau | time to plateau (s) | GFLOPs to plateau | MFLOPs / step | ms / step | stopped at step |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (name, per_class, method), rows in sorted(groups.items(), key=lambda kv: (kv[0][0] != "ViT", kv[0][1],
                                                                                  METHODS.index(kv[0][2]))):
        capped = sum(not r["plateaued"] for r in rows)
        stop = _mean_std([r["stop_step"] for r in rows], "{:.0f}") + (f" ({capped} at the cap)" if capped else "")
        lines.append(
            f"| {name} | {per_class} | {LABELS[method]} | {_mean_std([100 * r['test_acc'] for r in rows], '{:.1f}')} | "
            f"{_mean_std([100 * r['best_test_acc'] for r in rows], '{:.1f}')} | "
            f"{_mean_std([r['agreement_cosine'] for r in rows], '{:.3f}')} | "
            f"{_mean_std([r['reached_step'] for r in rows], '{:.0f}')} | {_mean_std([r['reached_s'] for r in rows], '{:.0f}')} | "
            f"{_mean_std([r['reached_flops'] / 1e9 for r in rows], '{:.0f}')} | {rows[0]['flops_per_step'] / 1e6:.0f} | "
            f"{_mean_std([r['step_ms'] for r in rows], '{:.0f}')} | {stop} |")
    return "\n".join(lines)


def gains_table(records: list[dict[str, Any]]) -> str:
    """Paired by seed (the same images and initialisation): each method's plateau minus KD's, mean ± standard error,
    then the per-seed differences."""
    by_key = {(r["student"], r["per_class"], r["method"], r["seed"]): plateau_of(r)["test_acc"] for r in records}
    cells = sorted({(name, n) for name, n, _, _ in by_key}, key=lambda k: (k[0] != "ViT", k[1]))
    lines = ["| student | images / class | method | plateau gain over KD, points (± SE; per seed) |", "|---|---:|---|---|"]
    for name, per_class in cells:
        for method in ("ce", "kd+jacobian"):
            seeds = sorted(seed for n, c, m, seed in by_key if (n, c, m) == (name, per_class, method)
                           and (name, per_class, "kd", seed) in by_key)
            if not seeds:
                continue
            gains = [100 * (by_key[name, per_class, method, s] - by_key[name, per_class, "kd", s]) for s in seeds]
            error = statistics.stdev(gains) / math.sqrt(len(gains)) if len(gains) > 1 else 0.0
            lines.append(f"| {name} | {per_class} | {LABELS[method]} | {statistics.fmean(gains):+.1f} ± {error:.1f} "
                         f"({', '.join(f'{g:+.1f}' for g in gains)}) |")
    return "\n".join(lines)


def crossings_table(records: list[dict[str, Any]]) -> str:
    """Per seed, at equal FLOPs: where KD got to, and where KD + Eq. 10 was with the compute KD spent in all (the
    last evaluation within it); and the compute at which KD + Eq. 10's test accuracy first reached KD's plateau."""
    by_key = {(r["student"], r["per_class"], r["method"], r["seed"]): r for r in records}
    lines = ["| student | images / class | seed | KD plateau (%) | KD's compute in all (GFLOPs) | "
             "KD + Eq. 10 with that compute (%) | KD + Eq. 10 plateau (%) | GFLOPs: KD to its plateau | "
             "GFLOPs: KD + Eq. 10 to KD's plateau |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (name, per_class, method, seed), kd in sorted(by_key.items(), key=lambda kv: (kv[0][0] != "ViT", kv[0][1:])):
        jac = by_key.get((name, per_class, "kd+jacobian", seed))
        if method != "kd" or jac is None:
            continue
        kd_plateau, jac_plateau = plateau_of(kd), plateau_of(jac)
        spent = kd["curve"][-1]["flops"]
        within = [p for p in jac["curve"] if p["flops"] <= spent][-1]
        first = next((p for p in jac["curve"] if p["test_acc"] >= kd_plateau["test_acc"]), None)
        lines.append(f"| {name} | {per_class} | {seed} | {100 * kd_plateau['test_acc']:.1f} | {spent / 1e9:.0f} | "
                     f"{100 * within['test_acc']:.1f} | {100 * jac_plateau['test_acc']:.1f} | "
                     f"{kd_plateau['reached_flops'] / 1e9:.0f} | "
                     f"{'never' if first is None else format(first['flops'] / 1e9, '.0f')} |")
    return "\n".join(lines)


def plot_curves(records: list[dict[str, Any]], path: Path, axis: str) -> Path:
    """Test accuracy and agreement cosine against ``axis`` (``"flops"`` or ``"train_s"``), one panel column per
    student and size, one line per method: the mean over seeds, the seeds' range shaded. A seed that stopped
    earlier is carried at its last evaluation."""
    from matplotlib.figure import Figure  # plotting is optional for the library, always there for benchmarks

    panels = sorted({(r["student"], r["per_class"]) for r in records}, key=lambda k: (k[0] != "ViT", k[1]))
    fig = Figure(figsize=(4.2 * len(panels), 7), layout="constrained")
    axes = fig.subplots(2, len(panels), squeeze=False)
    scale, unit = (1e12, "TFLOPs (counted)") if axis == "flops" else (1.0, "training time (s, 2 workers x 1 thread)")
    colours = {"ce": "tab:gray", "kd": "tab:blue", "kd+jacobian": "tab:red"}
    for column, (name, per_class) in enumerate(panels):
        for method in METHODS:
            runs = [r for r in records if (r["student"], r["per_class"], r["method"]) == (name, per_class, method)]
            if not runs:
                continue
            length = max(len(r["curve"]) for r in runs)
            padded = [r["curve"] + [r["curve"][-1]] * (length - len(r["curve"])) for r in runs]
            longest = max(runs, key=lambda r: len(r["curve"]))["curve"]
            if axis == "flops":
                x = [p["flops"] / scale for p in longest]
            else:  # the seeds' mean time per step, so the curve does not jump where a seed stops
                per_step = statistics.fmean(r["train_s"] / max(r["steps"], 1) for r in runs)
                x = [p["step"] * per_step for p in longest]
            for row, key, factor in ((0, "test_acc", 100), (1, "agreement_cosine", 1)):
                values = torch.tensor([[factor * p[key] for p in curve] for curve in padded])
                ax = axes[row][column]
                ax.plot(x, values.mean(0).tolist(), color=colours[method], label=LABELS[method])
                ax.fill_between(x, values.min(0).values.tolist(), values.max(0).values.tolist(),
                                color=colours[method], alpha=0.2, linewidth=0)
        axes[0][column].set_title(f"{name}, {per_class} images / class")
        axes[0][column].set_ylabel("test accuracy (%)")
        axes[1][column].set_ylabel("agreement cosine (held out)")
        for row in range(2):
            axes[row][column].set_xlabel(unit)
            axes[row][column].grid(alpha=0.3)
    axes[0][0].legend(loc="lower right")
    fig.suptitle(f"Accuracy and input-gradient agreement against {'counted FLOPs' if axis == 'flops' else 'time'}; "
                 f"mean over seeds, range shaded")
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------------------
# the benchmark


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/plateau")
    parser.add_argument("--students", nargs="+", choices=sorted(STUDENTS), default=list(STUDENTS))
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    parser.add_argument("--samples-per-class", nargs="+", type=int, default=[5, 10])
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--jacobian-weights", nargs="+", default=[], metavar="STUDENT=LAMBDA",
                        help="Eq. 10 weights other than the results page's (ViT=10 CNN=3)")
    parser.add_argument("--min-gain", type=float, default=1.0,
                        help="points of validation accuracy the last third of a run must add to go on (default 1.0)")
    parser.add_argument("--max-steps", type=int, help="cap every run here (default: 6000 for the ViT, 3000 for the CNN)")
    parser.add_argument("--teacher-checkpoint", help="the few-sample experiment's teacher.safetensors (default: "
                        "train it into OUT as that experiment does, about 30 s)")
    parser.add_argument("--figure", help="draw the gradient maps of seed 0's ViT (10 images per class, KD + Eq. 10) "
                        "before and after training to this PNG")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    args = parser.parse_args(argv)
    out = Path(args.out)
    for item in args.jacobian_weights:
        name, _, value = item.partition("=")
        if name not in STUDENTS or not value:
            parser.error(f"--jacobian-weights takes STUDENT=LAMBDA with STUDENT in {', '.join(STUDENTS)}, got {item!r}")
        STUDENTS[name] = dataclasses.replace(STUDENTS[name], jacobian_weight=float(value))
    (out / "runs").mkdir(parents=True, exist_ok=True)
    options = {"min_gain": args.min_gain, "max_steps": args.max_steps, "figure": args.figure,
               "students": {name: dataclasses.asdict(STUDENTS[name]) for name in args.students}}
    defining = {key: value for key, value in options.items() if key != "figure"}  # what the records depend on
    identity = out / "plateau.json"
    if identity.exists() and json.loads(identity.read_text())["options"] != defining:
        print(f"{out} holds a plateau benchmark with other options; pass another --out", file=sys.stderr)
        return 2
    began = time.perf_counter()
    teacher_path = args.teacher_checkpoint
    if teacher_path is None:
        config = ExperimentConfig(out=str(out))
        teacher_path, _ = teacher_weights(config, load_data(config), init_runtime("cpu"), out)
    atomic_write_text(identity, json.dumps({"options": defining, "teacher": str(teacher_path),
                                            "hardware": {**hardware(), "workers": args.workers,
                                                         "threads_per_worker": args.threads}}, indent=1))

    runs = [Run(name, method, n, seed) for name in args.students for n in args.samples_per_class
            for method in args.methods for seed in range(args.seeds)]
    records = {r.name: json.loads((out / "runs" / f"{r.name}.json").read_text()) for r in runs
               if (out / "runs" / f"{r.name}.json").exists()}
    pending = [r for r in runs if r.name not in records]
    pending.sort(key=lambda r: (r.student != "ViT", r.method != "kd+jacobian", -r.per_class))  # longest first
    print(f"{len(runs)} runs, {len(records)} already done; {args.workers} workers x {args.threads} thread", flush=True)
    context = multiprocessing.get_context("spawn")
    with context.Pool(args.workers, initializer=_init_worker, initargs=(str(teacher_path), args.threads)) as pool:
        for record in pool.imap_unordered(_run_in_worker, [(r, options) for r in pending]):
            run = Run(record["student"], record["method"], record["per_class"], record["seed"])
            atomic_write_text(out / "runs" / f"{run.name}.json", json.dumps(record))
            records[run.name] = record
            plateau = plateau_of(record)
            print(f"[{len(records)}/{len(runs)}] {run.name}: {'plateau' if record['plateaued'] else 'cap'} at step "
                  f"{record['steps']}, test {100 * plateau['test_acc']:.1f}% (best {100 * plateau['best_test_acc']:.1f}%), "
                  f"cosine {plateau['agreement_cosine']:.3f}, {record['train_s']:.0f} s training, "
                  f"{record['flops_per_step'] / 1e6:.0f} MFLOPs/step", flush=True)
    done = [records[r.name] for r in runs]
    table = "\n\n".join((summary_table(done), gains_table(done), crossings_table(done)))
    atomic_write_text(out / "table.md", table + "\n")
    for axis, name in (("flops", "curves_flops.png"), ("train_s", "curves_time.png")):
        plot_curves(done, out / name, axis)
    print(table)
    print(f"wall time {time.perf_counter() - began:.0f} s; wrote {out / 'table.md'}, {out / 'runs'} and the curves")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
