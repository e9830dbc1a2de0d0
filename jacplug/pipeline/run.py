"""``jacplug train``: data, teacher, the distillation loop, evaluation, checkpoints, hooks, summary.

Optimizer: AdamW (``--lr`` 2e-3, ``--weight-decay`` 0.05) with a cosine decay to zero over all
steps, for the student and the loss terms' learnable adapters alike; norm and bias parameters get
no weight decay (timm's optimizer factory, see :mod:`.optim`). Why AdamW rather than SGD: the
demo trains from scratch for a few epochs on small data, where AdamW converges fast without a tuned
warm-up, and its per-parameter scaling absorbs the different gradient scales of the KD and
Jacobian terms.

One step is :meth:`jacplug.Distiller.compute_gradients` (cached teacher entries with
``--cache-teacher``; on the run's first step the gradient-flow check, unless ``--no-check-gradients``;
a CUDA graph after warm-up with ``--cuda-graphs``), then the finiteness check, the optimizer and
scheduler step, a ``metrics.jsonl`` record and ``on_step_end``.

Length: ``--epochs`` or ``--steps``, counted and defaulted by :mod:`.steps` (shared with
``jacplug experiment``); the student is evaluated, its checkpoints written and an ``epoch`` record
logged at every evaluation point of the plan (each epoch end, or with a step budget at most 10
epoch ends and the last step). ``config.json`` holds the configuration as the run executes it:
the length, the loss specs (the default preset spelled out), the image size and augmentation.

Resume: ``resume.safetensors`` is rewritten every ``--save-every`` steps and at every evaluation.
Step ``k``'s batch depends only on ``--seed`` and ``k``, so a resumed run regenerates the batch
order up to its saved step (without loading samples), restores the RNG states, and continues with
exactly the batches and random draws the interrupted run would have used (bit-identical on CPU
with ``--workers 0``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..distiller import Distiller
from ..errors import UserError
from ..graphcheck import raise_for_detached
from ..losses.composite import WeightedLoss
from ..losses.presets import DEFAULT_SPECS
from ..registry import create_dataset, get_host, model_pair
from . import cache as teacher_cache
from .checkpoint import atomic_write_text, load_model, load_resume, remove_stale_temp_files, save_model, save_resume
from .config import TrainConfig
from .data import DatasetSplits, Indexed, few_sample_subset
from .device import Runtime, any_rank, barrier, distribute, init_runtime, shutdown
from .evaluate import accuracy
from .lock import RunDirLock
from .metrics import MetricsLog, plot, read_metrics
from .optim import create_adamw
from .probe import probe_batch
from .progress import PhaseProgress, want_progress
from .models import build
from .steps import WARMUP_STEPS, StepPlan, batch_stream, default_length, stream_batch, stream_plan, warn_if_few
from .teacher import TEACHER_FILE, build_teacher, cosine_schedule, prepare_teacher, teacher_length

RESUME_FILE = "resume.safetensors"
BEST_FILE = "student_best.safetensors"
LAST_FILE = "student_last.safetensors"
CONFIG_FILE = "config.json"
CACHE_FILE = "teacher_cache.safetensors"


@dataclass
class RunContext:
    """What lifecycle hooks receive as ``run``: the resolved config, the models, where files go."""

    config: TrainConfig
    out_dir: Path
    device: torch.device
    teacher: nn.Module
    student: nn.Module
    loss: WeightedLoss
    splits: DatasetSplits
    runtime: Runtime
    extra: dict[str, Any] = field(default_factory=dict)
    #: every kwarg the student's constructor received (``img_size`` included), recorded in its checkpoints
    student_kwargs: dict[str, Any] = field(default_factory=dict)


def default_out(config: TrainConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.teacher}-{config.student}-{stamp}"


def build_loss(config: TrainConfig) -> WeightedLoss:
    """The ``--loss`` specs (or :data:`~jacplug.losses.presets.DEFAULT_SPECS`) through the registry; feature terms get the
    registered teacher/student pair's layers and channels."""
    from ..losses import build_loss as from_specs, options_from_pair

    pair = model_pair(config.teacher, config.student)
    overrides = {"fitnet": options_from_pair(pair)} if pair is not None else None
    return from_specs(list(config.loss or DEFAULT_SPECS), overrides)


def load_data(config: TrainConfig) -> DatasetSplits:
    return create_dataset(
        config.dataset, root=config.data_root, download=config.download, image_size=config.image_size,
        augment=config.augment,
    )


def startup_probe(config: TrainConfig, loss: WeightedLoss, student: nn.Module, teacher: nn.Module,
                  splits: DatasetSplits, runtime: Runtime) -> None:
    """Every term once, with the student and a freshly built (untrained) teacher, on eight training
    images: an unsupported op, a bad option or a shape mismatch stops the run before the teacher is
    trained (and a term that cannot reach the student, unless ``--no-check-gradients``)."""
    probe = Distiller(student.to(runtime.device).train(), teacher.to(runtime.device), loss.to(runtime.device),
                      amp=runtime.amp_dtype, name=config.student)
    report = probe.check(*probe_batch(splits, runtime.device))
    if config.check_gradients:
        raise_for_detached(report)


def use_cuda_graphs(config: TrainConfig, runtime: Runtime) -> bool:
    """``--cuda-graphs``: ``auto`` captures on a single CUDA device; ``on`` insists (one line if it cannot)."""
    if config.cuda_graphs == "off":
        return False
    why_not = ("the run is not on CUDA" if runtime.device.type != "cuda"
               else "DistributedDataParallel's gradient hooks are not captured" if runtime.distributed else None)
    if why_not and config.cuda_graphs == "on":
        raise UserError(f"--cuda-graphs on: {why_not}; use --cuda-graphs auto or off")
    return why_not is None


def resolve_run(config: TrainConfig, splits: DatasetSplits, runtime: Runtime) -> tuple[TrainConfig, StepPlan]:
    """The configuration as this run executes it, and the student's step plan.

    Fills in what the user left to defaults: the length (:func:`.steps.default_length`), the loss
    specs, the image size and augmentation the dataset chose, the teacher's length when it is trained
    here. Saved as ``config.json``, so ``--resume`` and a reader see exactly what ran."""
    samples = len(splits.train)
    epochs, steps = config.epochs, config.steps
    if epochs is None and steps is None:
        per_epoch = math.ceil(samples / stream_batch(samples, config.batch_size, runtime.world_size))
        epochs, steps = default_length(per_epoch, config.samples_per_class is not None, config.max_steps_per_epoch)
    plan = stream_plan(samples, config.batch_size, epochs=epochs, steps=steps,
                       max_steps_per_epoch=config.max_steps_per_epoch, world_size=runtime.world_size)
    teacher_epochs, teacher_steps = config.teacher_epochs, config.teacher_steps
    if not config.teacher_checkpoint:
        teacher_epochs, teacher_steps = teacher_length(config)
    height, width = splits.input_shape[1:]
    resolved = dataclasses.replace(
        config, epochs=epochs, steps=steps, loss=list(config.loss or DEFAULT_SPECS), augment=splits.augment,
        image_size=height if height == width else config.image_size, teacher_epochs=teacher_epochs,
        teacher_steps=teacher_steps,
    )
    return resolved, plan


def _finite(values: dict[str, float], step: int, runtime: Runtime) -> None:
    """Raise on a non-finite loss, on every rank at once when any rank has one (see :func:`.device.any_rank`)."""
    bad = {k: v for k, v in values.items() if not math.isfinite(v)}
    if bad:
        any_rank(True, runtime)
        raise UserError(f"loss became non-finite at step {step} ({bad}); lower --lr or the weights of those terms")
    if any_rank(False, runtime):
        raise UserError(f"loss became non-finite at step {step} on another process; lower --lr or the weights "
                        "of the loss terms")


def train(config: TrainConfig) -> dict[str, Any]:
    """Run the whole pipeline described by ``config``; returns the summary (see :func:`_summary`)."""
    runtime = init_runtime(config.device)
    try:
        with contextlib.ExitStack() as held:
            return _train(config, runtime, held)
    finally:
        shutdown(runtime)


def _run_dir(config: TrainConfig, runtime: Runtime, held: contextlib.ExitStack) -> Path:
    """The run directory, locked by rank 0 for as long as ``held`` is open (see :mod:`.lock`); a
    directory another run holds is refused on every rank."""
    out = Path(config.out) if config.out else default_out(config)
    refusal = None
    if runtime.is_main:
        try:
            held.enter_context(RunDirLock(out))
        except UserError as exc:
            refusal = str(exc)
    if runtime.distributed:  # every rank must use rank 0's timestamp, and fail when rank 0 could not lock
        holder = [str(out), refusal]
        torch.distributed.broadcast_object_list(holder, src=0)
        out, refusal = Path(holder[0]), holder[1]
        resuming = [None] * runtime.world_size  # each rank decided alone (--resume auto) what --out holds
        torch.distributed.all_gather_object(resuming, bool(config.resume))
        if refusal is None and len(set(resuming)) > 1:
            refusal = (f"the ranks disagree on whether {str(out)!r} holds a run to resume (resuming: {resuming}); "
                       "--out must be a directory every rank reads, on a shared filesystem")
    if refusal:
        raise UserError(refusal)
    if runtime.is_main:
        remove_stale_temp_files(out)  # left by a run killed mid-write; we hold the lock, so no writer owns them
    if config.resume:
        if not (out / CONFIG_FILE).is_file():
            raise UserError(f"--resume: {str(out)!r} holds no run (no {CONFIG_FILE}); pass the run's directory as --out")
    elif (out / RESUME_FILE).exists() or (out / LAST_FILE).exists():
        raise UserError(f"{str(out)!r} already holds a run; pass --resume (or --resume auto) to continue it, or "
                        "choose another --out")
    return out


def _train(config: TrainConfig, runtime: Runtime, held: contextlib.ExitStack) -> dict[str, Any]:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    show = want_progress(config.progress, runtime.is_main)
    run_dir = _run_dir(config, runtime, held)
    graphs = use_cuda_graphs(config, runtime)
    # everything a user can get wrong is checked before any training starts
    full = load_data(config)
    splits = few_sample_subset(full, config.samples_per_class, config.seed) if config.samples_per_class else full
    config, plan = resolve_run(config, splits, runtime)
    loss = build_loss(config)
    student_built = build("student", config.student, splits, config.student_kwargs)
    student = student_built.module
    with torch.random.fork_rng(devices=[]):  # a throwaway build must not shift the run's seeds
        built_teacher = build_teacher(config, full, run_dir)  # a bad name, kwarg or input size fails now
    probe_teacher = built_teacher.module
    if config.teacher_checkpoint and not (config.resume and (run_dir / TEACHER_FILE).is_file()):
        # a missing, corrupt or mismatched checkpoint is refused before anything is written
        load_model(config.teacher_checkpoint, probe_teacher, expected_name=config.teacher,
                   num_classes=full.num_classes, in_chans=full.in_chans, model_kwargs=built_teacher.kwargs)
    if config.cache_teacher:
        teacher_cache.check_cacheable(loss, splits.augment, config.dataset)
    if not config.resume:
        startup_probe(config, loss, student, probe_teacher, splits, runtime)
    del probe_teacher
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / CONFIG_FILE, config.to_json())
        warn_if_few(plan, "student", "--steps")
    log = MetricsLog(run_dir, enabled=runtime.is_main)
    if config.resume and not config.teacher_checkpoint and not (run_dir / TEACHER_FILE).is_file():
        log.truncate_after(0, keep_teacher=False)  # the teacher's training was interrupted: it starts again

    teacher, teacher_source, teacher_speed = prepare_teacher(config, full, runtime, run_dir, log, show)
    teacher_acc = accuracy(teacher, splits.test, runtime, batch_size=config.eval_batch_size, show=show, desc="teacher test")

    student = student.to(runtime.device)
    loss = loss.to(runtime.device)
    if runtime.channels_last:
        student = student.to(memory_format=torch.channels_last)
    optimizer = create_adamw({"student": student, "loss": loss}, lr=config.lr, weight_decay=config.weight_decay,
                             fused=runtime.device.type == "cuda")
    scheduler = cosine_schedule(optimizer, plan.total)
    position: dict[str, Any] = {"step": 0, "best_acc": -1.0, "sums": {}, "count": 0}
    if config.resume and (run_dir / RESUME_FILE).is_file():
        position = load_resume(run_dir / RESUME_FILE, student=student, loss=loss, optimizer=optimizer,
                               scheduler=scheduler)
    if config.resume:  # steps past the saved position (all of them when none was saved) run again
        log.truncate_after(position["step"])

    distiller = Distiller(distribute(student, runtime), teacher, loss, amp=runtime.amp_dtype, capture=graphs,
                          check_gradients=config.check_gradients and position["step"] == 0, name=config.student)

    lookup = None
    if config.cache_teacher:
        cache_path = run_dir / CACHE_FILE
        key = teacher_cache.cache_key(teacher, splits.train, config.loss, runtime, config.eval_batch_size)
        if runtime.is_main and not teacher_cache.TeacherCache.matches(cache_path, key):
            teacher_cache.build(cache_path, teacher, loss, splits.train, runtime, config.eval_batch_size, key, show)
        barrier(runtime)
        lookup = teacher_cache.TeacherCache(cache_path, runtime.device)

    context = RunContext(config=config, out_dir=run_dir, device=runtime.device, teacher=teacher, student=student,
                         loss=loss, splits=splits, runtime=runtime,
                         extra={"teacher_acc": teacher_acc, "teacher_source": teacher_source, "plan": plan},
                         student_kwargs=student_built.kwargs)
    report = PhaseProgress(f"student {config.student}", plan, bars=show, enabled=runtime.is_main)
    loop = Loop(context, distiller, optimizer, scheduler, lookup, log, position, plan, report, show)
    if runtime.is_main:
        get_host().notify("on_train_start", run=context)
    last_eval = loop.train(started)

    summary = _summary(config, run_dir, teacher_acc, teacher_source, position, last_eval, started, splits, plan)
    seconds, images = loop.throughput["seconds"], loop.throughput["images"]
    summary["student_images_per_s"] = images / seconds if seconds else None
    summary["teacher_images_per_s"] = teacher_speed
    summary["student_steps_run"] = distiller.capture_status
    if runtime.is_main:
        if (run_dir / "metrics.jsonl").is_file():
            summary["plot"] = str(plot(run_dir))
        get_host().notify("on_train_end", run=context, summary=summary)
    return summary


@dataclass
class Loop:
    """The distillation loop's state between steps: what a step, an evaluation and a resume save need.

    ``position`` is what ``resume.safetensors`` stores: ``step`` (optimizer steps done),
    ``best_acc``/``best``, and the running ``sums``/``count`` of the per-term means since the last
    evaluation.
    """

    run: RunContext
    distiller: Distiller  # its student DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    cache: Any  # teacher_cache.TeacherCache or None
    log: MetricsLog
    position: dict[str, Any]
    plan: StepPlan
    report: PhaseProgress
    show: bool
    fallback_reported: bool = False
    throughput: dict[str, float] = field(default_factory=lambda: {"seconds": 0.0, "images": 0})

    def train(self, started: float) -> dict[str, Any]:
        """Run the plan from ``position["step"]`` to its end, one evaluation round at a time; returns
        the last evaluation record (from ``metrics.jsonl`` when a resumed run had nothing left to do)."""
        run, position, plan = self.run, self.position, self.plan
        config, runtime = run.config, run.runtime
        train_set = Indexed(run.splits.train)
        stream = batch_stream(len(train_set), config.batch_size, config.seed, start=position["step"],
                              rank=runtime.rank, world_size=runtime.world_size)
        records = [r for r in read_metrics(run.out_dir) if r.get("kind") == "epoch"]
        last: dict[str, Any] = records[-1] if records else {}
        while position["step"] < plan.total:
            first, end = position["step"], plan.next_evaluation(position["step"])
            loader = DataLoader(train_set, batch_sampler=list(itertools.islice(stream, end - first)),
                                num_workers=config.workers, pin_memory=runtime.device.type == "cuda")
            self.distiller.train()
            for inputs, targets, indices in self.report.round(loader, first, end):
                metrics = self.step(inputs, targets, indices)
                for key, value in metrics.items():
                    if key != "lr":
                        position["sums"][key] = position["sums"].get(key, 0.0) + value
                position["count"] += 1
                step = position["step"]
                self.report.step(step, metrics["loss"])
                self.log.write({"kind": "step", "step": step, "epoch": plan.epoch_of(step),
                                "images": step * plan.batch, **metrics})
                if runtime.is_main:
                    get_host().notify("on_step_end", run=run, step=step, metrics=metrics)
                if config.save_every and step % config.save_every == 0 and step < end:
                    self.save_resume()
            last = self.evaluate(started)
        return last

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> dict[str, float]:
        """One optimisation step; returns ``loss`` (weighted total), each term (unweighted) and ``lr``.

        The gradients come from :meth:`jacplug.Distiller.compute_gradients` (a CUDA graph after
        warm-up, see :mod:`jacplug.capture`); the finiteness check, the optimizer and the schedule run
        eagerly.
        """
        runtime = self.run.runtime
        started = time.perf_counter()
        inputs = inputs.to(runtime.device, non_blocking=True)
        targets = targets.to(runtime.device, non_blocking=True)
        if runtime.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        cached = self.cache.lookup(indices) if self.cache is not None else None
        out = self.distiller.compute_gradients(inputs, targets, cached=cached)
        values = {k: float(v) for k, v in out.items() if k != "output"}
        # before the update: a non-finite step changes nothing; every rank stops at the same step
        _finite(values, self.position["step"] + 1, runtime)
        self.optimizer.step()
        self.scheduler.step()
        self.position["step"] += 1
        if self.distiller.steps_run > WARMUP_STEPS:  # steady state: after cuDNN's autotuning and the capture
            self.throughput["seconds"] += time.perf_counter() - started  # values were read: the GPU is done
            self.throughput["images"] += len(targets)
        fallback = self.distiller.capture_fallback
        if fallback and not self.fallback_reported:
            self.fallback_reported = True
            if runtime.is_main:
                print(f"jacplug: CUDA graph capture failed, training eagerly: {fallback}", file=sys.stderr)
        return {**values, "lr": self.optimizer.param_groups[0]["lr"]}

    def evaluate(self, started: float) -> dict[str, Any]:
        """Evaluate, write the student checkpoints, the epoch record and the resume state; returns the record."""
        run, position, plan = self.run, self.position, self.plan
        config, runtime, splits = run.config, run.runtime, run.splits
        step = position["step"]
        epoch = plan.epoch_of(step)
        count = max(position["count"], 1)
        metrics: dict[str, Any] = {"train_loss": position["sums"].get("loss", 0.0) / count}
        metrics.update({k: v / count for k, v in position["sums"].items() if k != "loss"})
        for name, split in (("val_acc", splits.val), ("test_acc", splits.test)):
            if split is not None:
                metrics[name] = accuracy(run.student, split, runtime, batch_size=config.eval_batch_size,
                                         show=self.show, desc=name.split("_")[0])
        score = metrics.get("val_acc", metrics["test_acc"])
        scores = {"epoch": epoch, "step": step, **{k: v for k, v in metrics.items() if k.endswith("_acc")}}
        improved = score > position["best_acc"]
        if runtime.is_main:
            meta = dict(name=config.student, num_classes=splits.num_classes, input_shape=splits.input_shape,
                        mean=splits.mean, std=splits.std, config=config.to_dict(), metrics=scores,
                        model_kwargs=run.student_kwargs)
            if improved:
                save_model(run.out_dir / BEST_FILE, run.student, role="student_best", **meta)
            save_model(run.out_dir / LAST_FILE, run.student, role="student_last", **meta)
        if improved:
            position["best_acc"], position["best"] = score, scores
        record = {"kind": "epoch", "epoch": epoch, "step": step, "images": step * plan.batch, **metrics,
                  "time_s": round(time.perf_counter() - started, 3)}
        self.log.write(record)  # before the resume save: a kill in between drops the record on resume
        position.update(sums={}, count=0)
        self.save_resume()
        self.report.evaluated(step, record)
        if runtime.is_main:
            get_host().notify("on_epoch_end", run=run, epoch=epoch, metrics=metrics)
        return record

    def save_resume(self) -> None:
        run = self.run
        if run.runtime.is_main:
            save_resume(run.out_dir / RESUME_FILE, student=run.student, loss=run.loss, optimizer=self.optimizer,
                        scheduler=self.scheduler, position=self.position, config=run.config.to_dict())


def _summary(config, run_dir, teacher_acc, teacher_source, position, last, started, splits, plan) -> dict[str, Any]:
    """Accuracies (test split), the training length, final per-term losses (means since the previous
    evaluation), time, file locations."""
    best = position.get("best", {})
    terms = {k: v for k, v in last.items()
             if k not in ("kind", "epoch", "step", "images", "time_s") and not k.endswith("_acc")}
    own_teacher = run_dir / TEACHER_FILE
    teacher_file = str(own_teacher) if own_teacher.is_file() or not config.teacher_checkpoint else config.teacher_checkpoint
    return {
        "teacher": config.teacher,
        "student": config.student,
        "dataset": config.dataset,
        "train_samples": len(splits.train),
        "optimizer_steps": plan.total,
        "batch": plan.batch,
        "images_seen": plan.images,
        "epochs": plan.epochs,
        "teacher_test_acc": teacher_acc,
        "teacher_source": teacher_source,
        "student_last_test_acc": last.get("test_acc"),
        "student_best_test_acc": best.get("test_acc"),
        "student_best_epoch": best.get("epoch"),
        "student_best_step": best.get("step"),
        "best_chosen_on": "val" if splits.val is not None else "test",
        "final_losses": terms,
        "time_s": time.perf_counter() - started,
        "run_dir": str(run_dir),
        "checkpoints": {"teacher": teacher_file, "student_best": str(run_dir / BEST_FILE),
                        "student_last": str(run_dir / LAST_FILE)},
    }
