"""``jacplug train``: data, teacher, the distillation loop, evaluation, checkpoints, hooks, summary.

Optimizer: AdamW (``--lr`` 2e-3, ``--weight-decay`` 0.05) with a cosine decay to zero over all
steps, for the student and the loss terms' learnable adapters alike; norm and bias parameters get
no weight decay (timm's optimizer factory, see :mod:`.optim`). Why AdamW rather than SGD: the
demo trains from scratch for a few epochs on small data, where AdamW converges fast without a tuned
warm-up, and its per-parameter scaling absorbs the different gradient scales of the KD and
Jacobian terms.

Order of one step: cached teacher entries (``--cache-teacher``) or the teacher's forward; the
student's forward; each term (:func:`.step.compute_terms`); on the run's first step the
gradient-flow check (:func:`jacplug.graphcheck.gradient_flow`, unless ``--no-check-gradients``);
``backward``; optimizer and scheduler step; a ``metrics.jsonl`` record and ``on_step_end``.

Resume: ``resume.safetensors`` is rewritten every ``--save-every`` steps and at every epoch end.
An epoch's sample order depends only on ``--seed`` and the epoch, so a resumed run rebuilds the
epoch's order, skips the batches already consumed (without loading them), restores the RNG states,
and continues with exactly the batches and random draws the interrupted run would have used
(bit-identical on CPU with ``--workers 0``).
"""

from __future__ import annotations

import contextlib
import math
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..capture import CapturedStep
from ..errors import UserError
from ..graphcheck import gradient_flow, raise_for_detached
from ..losses.composite import WeightedLoss
from ..registry import create_dataset, get_host, model_pair
from . import cache as teacher_cache
from .checkpoint import atomic_write_text, load_resume, remove_stale_temp_files, save_model, save_resume
from .config import TrainConfig
from .data import DatasetSplits, Indexed, few_sample_subset
from .device import Runtime, any_rank, average_gradients, barrier, distribute, init_runtime, shutdown
from .evaluate import accuracy
from .lock import RunDirLock
from .metrics import MetricsLog, plot, read_metrics
from .optim import create_adamw
from .probe import probe_batch, probe_terms
from .progress import progress, want_progress
from .step import compute_terms, weighted_total, with_every_parameter
from .models import build
from .teacher import TEACHER_FILE, build_teacher, cosine_schedule, prepare_teacher

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
    """The ``--loss`` specs through the registry, or the default preset; feature terms get the
    registered teacher/student pair's layers and channels."""
    from ..losses import build_loss as from_specs, jacobian_distillation, options_from_pair

    if not config.loss:
        return jacobian_distillation()
    pair = model_pair(config.teacher, config.student)
    overrides = {"fitnet": options_from_pair(pair)} if pair is not None else None
    return from_specs(config.loss, overrides)


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
    teacher = teacher.to(runtime.device).eval().requires_grad_(False)
    inputs, targets = probe_batch(splits, runtime.device)
    report = probe_terms(loss.to(runtime.device), student.to(runtime.device).train(), teacher, inputs, targets,
                         runtime, config.student)
    if config.check_gradients:
        raise_for_detached(report)


#: steps of a process left out of its images/s figure: CapturedStep's three eager warm-up steps
#: (where cuDNN autotunes) and the capture
WARMUP_STEPS = 4


def use_cuda_graphs(config: TrainConfig, runtime: Runtime) -> bool:
    """``--cuda-graphs``: ``auto`` captures on a single CUDA device; ``on`` insists (one line if it cannot)."""
    if config.cuda_graphs == "off":
        return False
    why_not = ("the run is not on CUDA" if runtime.device.type != "cuda"
               else "DistributedDataParallel's gradient hooks are not captured" if runtime.distributed else None)
    if why_not and config.cuda_graphs == "on":
        raise UserError(f"--cuda-graphs on: {why_not}; use --cuda-graphs auto or off")
    return why_not is None


def epoch_batches(n: int, batch_size: int, epoch: int, runtime: Runtime, seed: int) -> list[list[int]]:
    """This rank's batches (dataset indices) for ``epoch``: a seeded shuffle, sharded like
    ``DistributedSampler``; a trailing batch of one sample is dropped (train-mode BatchNorm
    cannot normalise a single sample)."""
    sampler = DistributedSampler(range(n), num_replicas=runtime.world_size, rank=runtime.rank, shuffle=True, seed=seed)
    sampler.set_epoch(epoch)
    order = list(sampler)
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    return [b for b in batches if len(b) > 1]


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
    if refusal:
        raise UserError(refusal)
    if runtime.is_main:
        remove_stale_temp_files(out)  # left by a run killed mid-write; we hold the lock, so no writer owns them
    if config.resume:
        if not (out / CONFIG_FILE).is_file():
            raise UserError(f"--resume: {str(out)!r} holds no run (no {CONFIG_FILE}); pass the run's directory as --out")
    elif (out / RESUME_FILE).exists() or (out / LAST_FILE).exists():
        raise UserError(f"{str(out)!r} already holds a run; pass --resume to continue it, or choose another --out")
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
    loss = build_loss(config)
    student_built = build("student", config.student, splits, config.student_kwargs)
    student = student_built.module
    with torch.random.fork_rng(devices=[]):  # a throwaway build must not shift the run's seeds
        probe_teacher = build_teacher(config, full, run_dir).module  # a bad name, kwarg or input size fails now
    if config.cache_teacher:
        teacher_cache.check_cacheable(loss, splits.augment, config.dataset)
    if not config.resume:
        startup_probe(config, loss, student, probe_teacher, splits, runtime)
    del probe_teacher
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / CONFIG_FILE, config.to_json())
    log = MetricsLog(run_dir, enabled=runtime.is_main)
    if config.resume and not config.teacher_checkpoint and not (run_dir / TEACHER_FILE).is_file():
        log.truncate_after(0, keep_teacher=False)  # the teacher's training was interrupted: it starts again

    teacher, teacher_source = prepare_teacher(config, full, runtime, run_dir, log, show)
    teacher_acc = accuracy(teacher, splits.test, runtime, batch_size=config.eval_batch_size, show=show, desc="teacher test")

    student = student.to(runtime.device)
    loss = loss.to(runtime.device)
    if runtime.channels_last:
        student = student.to(memory_format=torch.channels_last)
    trainable = [p for p in list(student.parameters()) + list(loss.parameters()) if p.requires_grad]
    optimizer = create_adamw({"student": student, "loss": loss}, lr=config.lr, weight_decay=config.weight_decay,
                             fused=runtime.device.type == "cuda")
    batches_per_epoch = len(epoch_batches(len(splits.train), config.batch_size, 0, runtime, config.seed))
    if batches_per_epoch == 0:
        raise UserError(f"the training split has {len(splits.train)} sample(s); at least 2 are needed per batch")
    steps_per_epoch = min(batches_per_epoch, config.max_steps_per_epoch or batches_per_epoch)
    scheduler = cosine_schedule(optimizer, config.epochs * steps_per_epoch)
    position: dict[str, Any] = {"epoch": 0, "batch": 0, "step": 0, "best_acc": -1.0, "sums": {}, "count": 0}
    if config.resume and (run_dir / RESUME_FILE).is_file():
        position = load_resume(run_dir / RESUME_FILE, student=student, loss=loss, optimizer=optimizer,
                               scheduler=scheduler)
    if config.resume:  # steps past the saved position (all of them when none was saved) run again
        log.truncate_after(position["step"])

    model = distribute(student, loss, runtime)

    lookup = None
    if config.cache_teacher:
        cache_path = run_dir / CACHE_FILE
        key = teacher_cache.fingerprint(teacher, {"config": {k: getattr(config, k) for k in (
            "dataset", "samples_per_class", "image_size", "seed", "loss", "data_root")}, "n": len(splits.train)})
        if runtime.is_main and not teacher_cache.TeacherCache.matches(cache_path, key):
            teacher_cache.build(cache_path, teacher, loss, splits.train, runtime.device, config.eval_batch_size, key, show)
        barrier(runtime)
        lookup = teacher_cache.TeacherCache(cache_path, runtime.device)

    context = RunContext(config=config, out_dir=run_dir, device=runtime.device, teacher=teacher, student=student,
                         loss=loss, splits=splits, runtime=runtime,
                         extra={"teacher_acc": teacher_acc, "teacher_source": teacher_source},
                         student_kwargs=student_built.kwargs)
    loop = Loop(context, model, optimizer, scheduler, trainable, lookup, log, position, show, steps_per_epoch)
    loop.captured = CapturedStep(loop.forward_backward, enabled=graphs)
    if runtime.is_main:
        get_host().notify("on_train_start", run=context)
    epoch_records = [r for r in read_metrics(run_dir) if r.get("kind") == "epoch"]
    last_epoch: dict[str, Any] = epoch_records[-1] if epoch_records else {}
    for epoch in range(position["epoch"], config.epochs):
        loop.train_epoch(epoch)
        last_epoch = loop.end_epoch(epoch, started)

    summary = _summary(config, run_dir, teacher_acc, teacher_source, position, last_epoch, started, splits)
    seconds, images = loop.throughput["seconds"], loop.throughput["images"]
    summary["student_images_per_s"] = images / seconds if seconds else None
    summary["student_steps_run"] = loop.graph_status()
    if runtime.is_main:
        if (run_dir / "metrics.jsonl").is_file():
            summary["plot"] = str(plot(run_dir))
        get_host().notify("on_train_end", run=context, summary=summary)
    return summary


@dataclass
class Loop:
    """The distillation loop's state between steps: what a step, an epoch end and a resume save need.

    ``position`` is what ``resume.safetensors`` stores: ``epoch`` (next to run, from 0), ``batch``
    (batches of it already consumed), ``step`` (global), ``best_acc``/``best``, and the running
    ``sums``/``count`` of the epoch's per-term means.
    """

    run: RunContext
    model: nn.Module  # the student, DDP-wrapped under torchrun
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    trainable: list[torch.Tensor]
    cache: Any  # teacher_cache.TeacherCache or None
    log: MetricsLog
    position: dict[str, Any]
    show: bool
    steps_per_epoch: int
    captured: CapturedStep | None = None  # set right after construction
    fallback_reported: bool = False
    throughput: dict[str, float] = field(default_factory=lambda: {"seconds": 0.0, "images": 0})

    def graph_status(self) -> str:
        """How the steps ran: ``CUDA graph``, ``eager``, or ``eager (capture failed: ...)``."""
        if self.captured is None or self.captured.fallback == "disabled":
            return "eager"
        return "CUDA graph" if self.captured.captured else f"eager (capture failed: {self.captured.fallback})"

    def train_epoch(self, epoch: int) -> None:
        """One epoch from ``position["batch"]`` on (0 unless resuming mid-epoch)."""
        run, position = self.run, self.position
        config, runtime = run.config, run.runtime
        train_set = Indexed(run.splits.train)
        batches = epoch_batches(len(train_set), config.batch_size, epoch, runtime, config.seed)[: self.steps_per_epoch]
        start = position["batch"] if position["epoch"] == epoch else 0
        if not start:
            position.update(sums={}, count=0)
        loader = DataLoader(train_set, batch_sampler=batches[start:], num_workers=config.workers,
                            pin_memory=runtime.device.type == "cuda")
        self.model.train()
        bar = progress(loader, desc=f"student {epoch + 1}/{config.epochs}", show=self.show, total=len(batches) - start)
        for b, (inputs, targets, indices) in enumerate(bar, start=start):
            metrics = self.step(inputs, targets, indices)
            for key, value in metrics.items():
                if key != "lr":
                    position["sums"][key] = position["sums"].get(key, 0.0) + value
            position["count"] += 1
            if self.show:
                bar.set_postfix(loss=f"{metrics['loss']:.4g}")
            self.log.write({"kind": "step", "epoch": epoch + 1, "step": position["step"], **metrics})
            if runtime.is_main:
                get_host().notify("on_step_end", run=run, step=position["step"], metrics=metrics)
            if config.save_every and position["step"] % config.save_every == 0 and b + 1 < len(batches):
                position.update(epoch=epoch, batch=b + 1)
                self.save_resume()

    def step(self, inputs: torch.Tensor, targets: torch.Tensor, indices: torch.Tensor) -> dict[str, float]:
        """One optimisation step; returns ``loss`` (weighted total), each term (unweighted) and ``lr``.

        The forward and backward run through :attr:`captured` (a CUDA graph after warm-up, see
        :mod:`jacplug.capture`); the finiteness check, the optimizer and the schedule run eagerly.
        """
        runtime = self.run.runtime
        started = time.perf_counter()
        inputs = inputs.to(runtime.device, non_blocking=True)
        targets = targets.to(runtime.device, non_blocking=True)
        if runtime.channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
        cached = self.cache.lookup(indices) if self.cache is not None else {}
        values = {k: float(v) for k, v in self.captured(inputs, targets, *cached.values()).items()}
        # before the update: a non-finite step changes nothing; every rank stops at the same step
        _finite(values, self.position["step"] + 1, runtime)
        average_gradients(self.run.loss.parameters(), runtime)  # DDP averages only the student's gradients
        self.optimizer.step()
        self.scheduler.step()
        self.position["step"] += 1
        if self.captured.calls > WARMUP_STEPS:  # steady state: after cuDNN's autotuning and the capture
            self.throughput["seconds"] += time.perf_counter() - started  # values were read: the GPU is done
            self.throughput["images"] += len(targets)
        if self.captured.fallback not in (None, "disabled") and not self.fallback_reported:
            self.fallback_reported = True
            if self.run.runtime.is_main:
                print(f"jacplug: CUDA graph capture failed, training eagerly: {self.captured.fallback}",
                      file=sys.stderr)
        return {**values, "lr": self.optimizer.param_groups[0]["lr"]}

    def forward_backward(self, inputs: torch.Tensor, targets: torch.Tensor, *cached: torch.Tensor) -> dict[str, torch.Tensor]:
        """Gradients of the weighted loss in ``.grad`` (accumulated into zeroed tensors, which keeps
        them the same tensors for a CUDA graph); returns the detached total and terms, no host sync.
        On the run's first step the gradient-flow check runs first (eagerly: warm-up precedes capture)."""
        run = self.run
        loss = run.loss
        entries = dict(zip(self.cache.keys, cached)) if cached else None
        values = compute_terms(loss, self.model, run.teacher, inputs, targets, run.runtime, entries)
        if self.position["step"] == 0 and run.config.check_gradients:
            gradient_flow(values, self.trainable)  # a detached term fails here, before any update
        total = weighted_total(loss, values)
        if run.runtime.distributed:
            total = with_every_parameter(total, self.trainable)
        self.optimizer.zero_grad(set_to_none=False)
        total.backward()
        return {"loss": total.detach(), **{k: v.detach() for k, v in values.items()}}

    def end_epoch(self, epoch: int, started: float) -> dict[str, Any]:
        """Evaluate, write the student checkpoints, the epoch record and the resume state; returns the record."""
        run, position = self.run, self.position
        config, runtime, splits = run.config, run.runtime, run.splits
        count = max(position["count"], 1)
        metrics: dict[str, Any] = {"train_loss": position["sums"].get("loss", 0.0) / count}
        metrics.update({k: v / count for k, v in position["sums"].items() if k != "loss"})
        for name, split in (("val_acc", splits.val), ("test_acc", splits.test)):
            if split is not None:
                metrics[name] = accuracy(run.student, split, runtime, batch_size=config.eval_batch_size,
                                         show=self.show, desc=name.split("_")[0])
        score = metrics.get("val_acc", metrics["test_acc"])
        scores = {"epoch": epoch + 1, **{k: v for k, v in metrics.items() if k.endswith("_acc")}}
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
        record = {"kind": "epoch", "epoch": epoch + 1, "step": position["step"], **metrics,
                  "time_s": round(time.perf_counter() - started, 3)}
        self.log.write(record)  # before the resume save: a kill in between drops the record on resume
        position.update(epoch=epoch + 1, batch=0, sums={}, count=0)
        self.save_resume()
        if runtime.is_main:
            get_host().notify("on_epoch_end", run=run, epoch=epoch + 1, metrics=metrics)
        return record

    def save_resume(self) -> None:
        run = self.run
        if run.runtime.is_main:
            save_resume(run.out_dir / RESUME_FILE, student=run.student, loss=run.loss, optimizer=self.optimizer,
                        scheduler=self.scheduler, position=self.position, config=run.config.to_dict())


def _summary(config, run_dir, teacher_acc, teacher_source, position, last, started, splits) -> dict[str, Any]:
    """Accuracies (test split), final per-term losses (last epoch's means), time, file locations."""
    best = position.get("best", {})
    terms = {k: v for k, v in last.items() if k not in ("kind", "epoch", "step", "time_s") and not k.endswith("_acc")}
    return {
        "teacher": config.teacher,
        "student": config.student,
        "dataset": config.dataset,
        "train_samples": len(splits.train),
        "teacher_test_acc": teacher_acc,
        "teacher_source": teacher_source,
        "student_last_test_acc": last.get("test_acc"),
        "student_best_test_acc": best.get("test_acc"),
        "student_best_epoch": best.get("epoch"),
        "best_chosen_on": "val" if splits.val is not None else "test",
        "final_losses": terms,
        "time_s": time.perf_counter() - started,
        "run_dir": str(run_dir),
        "checkpoints": {name: str(run_dir / f) for name, f in (
            ("teacher", "teacher.safetensors"), ("student_best", BEST_FILE), ("student_last", LAST_FILE))},
    }
