"""The few-sample experiment: one teacher, many short student runs, weights chosen on validation.

Protocol (after Srinivas & Fleuret 2018):

1. The teacher is trained once with cross-entropy on the whole training split (or loaded).
2. Selection: for each method with a weight to tune, every weight of its grid is trained at each
   ``select_at`` sample size with each of ``select_seeds`` (not among the reported seeds) and
   scored by VALIDATION accuracy only: those runs get splits whose ``test`` is ``None``, so they
   cannot read the test split. The weight with the best mean score at the nearest selection size
   (ties: the smaller weight) is used for that sample size. The score is clean validation accuracy,
   or with ``select_on="noise"`` the mean validation accuracy over ``noise_sigmas``.
3. Main grid: every method x sample size x seed, with the chosen weights; each run reports val and
   test accuracy after its last step (no early stopping, so the test split never picks anything),
   and with ``noise_sigmas`` the accuracy on inputs with additive Gaussian noise of each sigma.

Noise (for the robustness protocol): inputs are already normalised per channel, so ``sigma`` is in
units of the pixel standard deviation. One noise tensor ``z`` per split is drawn from a generator
seeded with ``noise_seed`` and used for every sigma (``x + sigma * z``) and every model, so the
methods and the teacher are scored on identical noisy images and the curves differ only by model.

Why a fixed number of optimisation steps rather than epochs: one image per class is 10 images, a
single batch; an epoch budget would give that run almost no updates. Every run takes ``steps``
AdamW steps on batches of ``min(batch_size, n_train)`` drawn from seeded permutations, with the
step arithmetic and batch order of :mod:`jacplug.training.plan` and the optimizer of
:mod:`jacplug.training.optim`, the same code ``jacplug train`` runs: a cell of the table is
``jacplug train --steps`` with the cell's options.

Determinism: each run seeds torch's global RNG with its seed before building the student, so its
result does not depend on which worker process runs it or in which order; the few-sample subset of
seed ``s`` is :func:`jacplug.data.datasets.few_sample_subset` with ``s`` (the same images for every
method, so methods are compared on identical data). On CPU with a fixed thread count a rerun is
bit-identical.

Where the runs execute (worker processes, one per GPU, Ray tasks) is :mod:`.executors`' job.
"""

from __future__ import annotations

import dataclasses
import math
import multiprocessing
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ..distiller import RESERVED_KEYS
from ..io.checkpoint import load_weights
from ..training.config import TrainConfig
from ..data.datasets import DatasetSplits, few_sample_subset
from ..training.runtime import Runtime
from ..events import Phase
from ..training.loop import StreamBatches
from ..training.observers import check_observers, observing
from ..training.phases import build_student_phase
from ..training.prepare import loss_for_pair, check_step
from ..checks.probe_batch import probe_batch
from ..commands.train_run import RunContext
from ..training.plan import stream_plan
from ..models.build import build_model
from ..training.teacher import TEACHER_FILE, end_teacher_resume, prepare_teacher
from .config import ExperimentConfig, RunSpec
from .methods import METHODS, get_method

# ---------------------------------------------------------------------------------------------------
# one run


def run_one(spec: RunSpec, config: ExperimentConfig, full: DatasetSplits, teacher: nn.Module,
            runtime: Runtime) -> dict[str, Any]:
    """Train a student for ``config.steps`` steps through the run loop and return the run's record
    (accuracies, losses, time); its events are those of a ``cell`` phase named :attr:`RunSpec.name`.

    Selection runs see splits without a test split, so they can only be scored on validation.
    """
    started = time.perf_counter()
    splits = few_sample_subset(full, spec.samples_per_class, spec.seed) if spec.samples_per_class else full
    if spec.phase == "select":
        splits = dataclasses.replace(splits, test=None)
    method = get_method(spec.method)
    specs = method.specs(dict(spec.weights), config)
    torch.manual_seed(spec.seed)
    student = build_model("student", config.student, splits, config.student_kwargs).module
    loss = loss_for_pair(specs, config.teacher, config.student)
    plan = stream_plan(len(splits.train), config.batch_size, steps=config.steps)
    batches = StreamBatches(splits.train, plan, config.batch_size, spec.seed, loader_workers(config, runtime),
                            pin_memory=runtime.device.type == "cuda", rounds="whole",
                            generator=torch.Generator().manual_seed(spec.seed))  # worker seeds; the global RNG stays the run's
    train_config = config.train_config(seed=spec.seed, samples_per_class=spec.samples_per_class, loss=list(specs))
    run = RunContext(config=train_config, out_dir=Path(config.out), device=runtime.device, teacher=teacher,
                     student=student, loss=loss, splits=splits, runtime=runtime)
    phase = Phase(kind="cell", name=spec.name, out_dir=Path(config.out), group=str(config.out),
                  params={**train_config.to_dict(), "method": spec.method, "phase": spec.phase,
                          **{f"weight_{key}": value for key, value in spec.weights}}, plan=plan)

    def noisy(model: nn.Module, split: Dataset) -> dict[str, Any]:
        return {"acc_noise": noisy_accuracy(model, split, config, runtime)}

    with observing(config.log, config.log_off):
        # a weight that diverges stops its run, which is scored as it stands: it loses the selection
        built = build_student_phase(run, phase, batches, capture=runtime.device.type == "cuda",
                                    split_scores=noisy if config.noise_sigmas else None, on_non_finite="stop")
        loop, events = built.loop, built.events
        events.emit("on_train_start")
        scores = loop.run()
        if loop.diverged_at is not None:
            scores = loop.evaluate(loop.position.step)
        record: dict[str, Any] = {
            **dataclasses.asdict(spec),
            "weights": dict(spec.weights),
            "loss": specs,
            "train_samples": len(splits.train),
            "final_terms": {k: v for k, v in loop.last_values.items() if k not in RESERVED_KEYS},
            "diverged_at_step": loop.diverged_at,
            **{k: v for k, v in scores.items() if k.startswith(("val_acc", "test_acc", "agreement_"))},
        }
        record["time_s"] = round(time.perf_counter() - started, 3)
        events.emit("on_train_end", summary=record)
    return record


def check_before_training(config: ExperimentConfig, full: DatasetSplits, runtime: Runtime) -> None:
    """Everything a run could refuse, checked once before the teacher is trained (which may take long):
    every sample size, both model names and kwargs (a given teacher checkpoint against the teacher),
    and each method's loss on a few training images (:meth:`jacplug.Distiller.check`: options, feature
    layers, ops without the derivatives a term takes) and the observers ``--log`` names. Leaves no trace (RNG
    state included)."""
    check_observers(config.log, config.log_off)
    for n in {*config.samples_per_class, *config.select_at} - {None}:
        few_sample_subset(full, n, config.seeds[0])
    devices = [runtime.device] if runtime.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        student = build_model("student", config.student, full, config.student_kwargs).module.to(runtime.device)
        if config.teacher_checkpoint:
            teacher = load_teacher(config, full, Path(config.teacher_checkpoint), runtime)
        else:
            teacher = build_model("teacher", config.teacher, full).module.to(runtime.device)
        inputs, targets = probe_batch(full, runtime.device)
        for name in config.methods:
            method = get_method(name)
            specs = method.specs({key: config.grid(key)[0] for key in method.uses}, config)
            check_step(student, teacher, loss_for_pair(specs, config.teacher, config.student), inputs, targets, runtime,
                       name=config.student)


def loader_workers(config: ExperimentConfig, runtime: Runtime) -> int:
    """Processes that load and augment training batches: ``config.loader_workers``, or by default none
    on CPU (the run's own worker processes already use every core) and 4 on a GPU, where loading
    64 augmented CIFAR images in the main process takes about as long as a KD step."""
    if config.loader_workers is not None:
        return config.loader_workers
    return 4 if runtime.device.type == "cuda" else 0


@torch.no_grad()
def noisy_accuracy(model: nn.Module, split: Dataset, config: ExperimentConfig, runtime: Runtime) -> dict[str, float]:
    """``{sigma: accuracy}`` on ``split`` with ``x + sigma * z`` as input, for each of ``config.noise_sigmas``.

    ``z`` is one standard-normal tensor for the whole split, drawn from a generator seeded with
    ``config.noise_seed``: every model and every sigma see the same noise direction, so two curves
    differ only by the models. Eval mode (restored afterwards), no autocast: the noise must not be
    rounded away.
    """
    inputs = torch.stack([split[i][0] for i in range(len(split))])
    targets = torch.tensor([int(split[i][1]) for i in range(len(split))])
    z = torch.randn(inputs.shape, generator=torch.Generator().manual_seed(config.noise_seed))
    was_training = model.training
    model.eval()
    scores = {}
    for sigma in config.noise_sigmas:
        correct = 0
        for start in range(0, len(inputs), config.eval_batch_size):
            chunk = slice(start, start + config.eval_batch_size)
            noisy = (inputs[chunk] + sigma * z[chunk]).to(runtime.device)
            correct += int((model(noisy).argmax(1).cpu() == targets[chunk]).sum())
        scores[f"{sigma:g}"] = correct / max(len(inputs), 1)
    model.train(was_training)
    return scores


# ---------------------------------------------------------------------------------------------------
# teacher


def teacher_weights(config: ExperimentConfig, splits: DatasetSplits, runtime: Runtime, out: Path) -> tuple[Path, str]:
    """Train the teacher on the full training split (or copy the given checkpoint's path); returns
    the weights file every worker loads, and where it came from."""
    if config.teacher_checkpoint:
        return Path(config.teacher_checkpoint), config.teacher_checkpoint
    # the teacher phase of `jacplug train` (resumable as there) with the experiment's teacher options; its batch
    # size and seed are train's defaults, the same for every experiment, so the experiment's seeds vary only the
    # students
    train_config = TrainConfig(teacher=config.teacher, teacher_epochs=config.teacher_epochs,
                               teacher_lr=config.teacher_lr, weight_decay=config.weight_decay,
                               eval_batch_size=config.eval_batch_size, workers=loader_workers(config, runtime),
                               dataset=config.dataset, out=config.out, log=list(config.log),
                               log_off=list(config.log_off), resume=bool(config.resume))
    torch.manual_seed(train_config.seed)
    run = RunContext(config=train_config, out_dir=out, device=runtime.device, teacher=None, student=None, loss=None,
                     splits=splits, runtime=runtime)
    with observing(config.log, config.log_off):
        prepare_teacher(train_config, splits, runtime, out, run, show=False, length_option="--teacher-epochs")
    end_teacher_resume(out, runtime)  # its weights are saved; the cells need nothing else of the phase
    return out / TEACHER_FILE, f"trained here ({config.teacher_epochs} epochs, seed {train_config.seed})"


def load_teacher(config: ExperimentConfig, splits: DatasetSplits, path: Path, runtime: Runtime) -> nn.Module:
    model = build_model("teacher", config.teacher, splits).module
    load_weights(path, model, expected_name=config.teacher, num_classes=splits.num_classes, in_chans=splits.in_chans)
    return model.to(runtime.device).eval().requires_grad_(False)


# ---------------------------------------------------------------------------------------------------
# the protocol


def selection_specs(config: ExperimentConfig) -> list[RunSpec]:
    """Grid runs of every tuned method at every ``select_at`` size, with ``select_seed``."""
    specs = []
    for name in config.methods:
        key = METHODS[name].tunes
        if key is None:
            continue
        for n in config.select_at:
            specs.extend(RunSpec(name, n, seed, ((key, w),), phase="select")
                         for w in config.grid(key) for seed in config.select_seeds)
    return specs


def selection_score(config: ExperimentConfig, record: dict[str, Any]) -> float:
    """What selection maximises: validation accuracy, clean or averaged over the noise levels."""
    if config.select_on == "noise":
        return statistics.fmean(record["val_acc_noise"].values())
    return record["val_acc"]


def _size(n: int | None, full_per_class: float) -> float:
    return full_per_class if n is None else float(n)


def choose_weights(config: ExperimentConfig, selection: list[dict[str, Any]],
                   full_per_class: float) -> dict[str, dict[str, float]]:
    """``{label of sample size: {weight key: chosen value}}`` for every reported sample size.

    Per key and selection size the weight with the best mean :func:`selection_score` over the
    selection seeds wins (ties: the smaller weight); each reported size uses the nearest selection
    size on a log scale. Keys that the requested methods use but nobody tuned in this run fall back
    to the middle of their grid.
    """
    scores: dict[tuple[str, int | None], dict[float, list[float]]] = {}
    for record in selection:
        if "test_acc" in record:
            raise RuntimeError("a selection run was scored on the test split")  # guarded by run_one
        key, weight = next(iter(record["weights"].items()))
        slot = scores.setdefault((key, record["samples_per_class"]), {})
        slot.setdefault(weight, []).append(selection_score(config, record))
    best = {slot: max(by_weight, key=lambda w: (statistics.fmean(by_weight[w]), -w))
            for slot, by_weight in scores.items()}
    keys = sorted({key for name in config.methods for key in METHODS[name].uses})
    chosen: dict[str, dict[str, float]] = {}
    for n in config.samples_per_class:
        nearest = min(config.select_at, key=lambda s: abs(math.log(_size(s, full_per_class) / _size(n, full_per_class))))
        weights = {}
        for key in keys:
            grid = config.grid(key)
            weights[key] = best.get((key, nearest), sorted(grid)[len(grid) // 2])
        chosen[size_label(n)] = weights
    return chosen


def size_label(n: int | None) -> str:
    return "all" if n is None else str(n)


def main_specs(config: ExperimentConfig, chosen: dict[str, dict[str, float]]) -> list[RunSpec]:
    return [
        RunSpec(name, n, seed, tuple((key, chosen[size_label(n)][key]) for key in METHODS[name].uses))
        for n in config.samples_per_class
        for name in config.methods
        for seed in config.seeds
    ]


def rounds_alike(published: dict[str, Any]) -> bool:
    """Whether this machine reproduces a record's figures bit for bit: CPU kernels are deterministic at a fixed
    thread count, but another CPU model (or torch build) takes other vectorised paths and rounds differently."""
    here = hardware()
    return (here["cpu"], here["torch"]) == (published["cpu"], published["torch"])


def hardware() -> dict[str, Any]:
    """What the results page must state about where the numbers came from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cpu_count": multiprocessing.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info
