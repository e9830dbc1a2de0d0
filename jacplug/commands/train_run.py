"""``jacplug train``: data, teacher, the distillation loop, evaluation, checkpoints, hooks, summary.

Optimizer: AdamW (``--lr`` 2e-3, ``--weight-decay`` 0.05) with a cosine decay to zero over all
steps, for the student and the loss terms' learnable adapters alike; norm and bias parameters get
no weight decay (timm's optimizer factory, see :mod:`.optim`). Why AdamW rather than SGD: the
demo trains from scratch for a few epochs on small data, where AdamW converges fast without a tuned
warm-up, and its per-parameter scaling absorbs the different gradient scales of the KD and
Jacobian terms.

Both phases run through the one run loop (:mod:`.loop`): the teacher's with a cross-entropy step
(:mod:`.teacher`, prepared as ``jacplug experiment`` prepares it), the student's built by
:mod:`.phases` (as every experiment cell is) with a :class:`jacplug.Distiller` (cached teacher entries with
``--cache-teacher``; on the run's first step the gradient-flow check, unless ``--no-check-gradients``;
a CUDA graph after warm-up with ``--cuda-graphs``). What the run writes besides the resume state
(``metrics.jsonl``, progress, the student's checkpoints, ``curves.png``, trackers with ``--log``) is
done by observer plugins on the loop's events (:mod:`.observe`).

Length: ``--epochs`` or ``--steps``, counted and defaulted by :mod:`.steps` (shared with
``jacplug experiment``); the student is evaluated, its checkpoints written and an ``epoch`` record
logged at every evaluation point of the plan (each epoch end, or with a step budget at most 10
epoch ends and the last step). ``config.json`` holds the configuration as the run executes it:
the length, the loss specs (the default preset spelled out), the image size and augmentation, and
beside them the unreadable images the data left out (``dropped_images``).

Resume: every phase writes its state when it starts, every ``--save-every`` steps and at every
evaluation (``teacher_resume.safetensors`` while the teacher trains, ``resume.safetensors`` for the
student; the teacher's is removed once the student's start is saved). A phase's batches are
regenerated from the seed up to its saved step (without loading samples) and the RNG states restored,
so a run killed in or between the phases continues with exactly the batches and random draws the
interrupted run would have used (bit-identical on CPU with ``--workers 0``). A run without
``--resume`` starts only in a new or empty directory (docs/pipeline.md, "The run directory").
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import shutil
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn

from ..errors import UserError
from ..losses.composite import WeightedLoss
from ..losses.presets import DEFAULT_SPECS
from ..events import Phase
from ..training import teacher_cache
from ..io.checkpoint import load_weights
from ..io.files import atomic_write_text, remove_stale_temp_files
from ..training.config import TrainConfig, run_record
from ..data.datasets import DatasetSplits, Indexed, few_sample_subset
from ..training.runtime import Runtime, init_runtime, shutdown
from ..training.evaluate import accuracy
from ..training.heldout import GRADIENT_MAPS
from ..io.folders import check_folder, removed_if_unused
from ..io.lock import LOCK_FILE, RunDirLock
from ..io.rundir import describe, leftovers
from ..training.loop import StreamBatches
from ..training.metrics import read_metrics
from ..models.build import build_model
from ..models.pretrained import teacher_view
from ..training.observers import check_observers, observing
from ..training.prepare import check_memory, loss_for_pair, check_step, load_data
from ..checks.probe_batch import probe_batch
from ..training.progress import want_progress
from ..training.plan import StepPlan, default_length, stream_batch, stream_plan, warn_if_few
from ..training.phases import build_student_phase
from ..training.teacher import (TEACHER_FILE, TEACHER_RESUME_FILE, build_teacher, end_teacher_resume,
                                prepare_teacher, teacher_length)

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
    teacher: nn.Module | None  # None while the teacher phase trains it
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
            check_folder(out, "--out")
            held.enter_context(removed_if_unused(out))  # ``runs/``, the missing parents of --out
            held.enter_context(RunDirLock(out))
            if not config.resume:
                _refuse_reuse(out)
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
    if config.resume and not (out / CONFIG_FILE).is_file():
        raise UserError(f"--resume: {str(out)!r} holds no run (no {CONFIG_FILE}); pass the run's directory as --out")
    return out


def _refuse_reuse(out: Path) -> None:
    """A new run (no ``--resume``) starts only in a new or empty directory: one line naming what an earlier
    run (or anything else) left there, and the ways on."""
    found = leftovers(out)
    if not found:
        return
    if (out / CONFIG_FILE).is_file():
        raise UserError(f"{str(out)!r} already holds a run ({describe(found)}); pass --resume (or --resume auto) to "
                        "continue it, or choose another --out")
    raise UserError(f"{str(out)!r} is not empty ({describe(found)}) and holds no run to resume (no {CONFIG_FILE}); "
                    "choose another --out")


def _train(config: TrainConfig, runtime: Runtime, held: contextlib.ExitStack) -> dict[str, Any]:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    show = want_progress(config.progress, runtime.is_main)
    run_dir = _run_dir(config, runtime, held)
    found = set(run_dir.iterdir()) if runtime.is_main and run_dir.is_dir() else None  # what the run did not write
    graphs = use_cuda_graphs(config, runtime)
    # everything a user can get wrong is checked before any training starts
    check_observers(config.log, config.log_off)
    full = load_data(config)
    splits = few_sample_subset(full, config.samples_per_class, config.seed) if config.samples_per_class else full
    config, plan = resolve_run(config, splits, runtime)
    check_memory(config, splits, runtime)  # a huge --image-size is refused before a model is built
    loss = loss_for_pair(config.loss, config.teacher, config.student)
    student_built = build_model("student", config.student, splits, config.student_kwargs)
    student = student_built.module
    with torch.random.fork_rng(devices=[]):  # a throwaway build must not shift the run's seeds
        built_teacher = build_teacher(config, full, run_dir)  # a bad name, kwarg or input size fails now
    probe_teacher = built_teacher.module
    if config.teacher_checkpoint and not (config.resume and (run_dir / TEACHER_FILE).is_file()):
        # a missing, corrupt or mismatched checkpoint is refused before anything is written
        load_weights(config.teacher_checkpoint, probe_teacher, expected_name=config.teacher,
                   num_classes=full.num_classes, in_chans=full.in_chans, model_kwargs=built_teacher.kwargs)
    if config.cache_teacher:
        teacher_cache.check_cacheable(loss, splits.augment, config.dataset)
    if not config.resume:  # every term once, with the student and the untrained teacher, on eight training images
        check_step(student, probe_teacher, loss, *probe_batch(splits, runtime.device), runtime, name=config.student,
                   require_flow=config.check_gradients,
                   teacher_input=teacher_view(config.teacher_checkpoint, splits.mean, splits.std))
    del probe_teacher
    if runtime.is_main:
        run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(run_dir / CONFIG_FILE, run_record(config, splits))
        warn_if_few(plan, "student", "--steps")

    context = RunContext(config=config, out_dir=run_dir, device=runtime.device, teacher=None, student=student,
                         loss=loss, splits=splits, runtime=runtime, extra={"plan": plan},
                         student_kwargs=student_built.kwargs)
    try:
        with observing(config.log, config.log_off, enabled=runtime.is_main):
            teacher, teacher_source, teacher_speed = prepare_teacher(config, full, runtime, run_dir, context, show)
            context.teacher = teacher
            return _student_phase(context, plan, teacher_source, teacher_speed, graphs, show, started)
    except UserError as exc:  # training had started: say what the run directory keeps
        raise UserError(f"{exc} [{_kept(run_dir, found)}]") from None


def _kept(run_dir: Path, found: set[Path] | None) -> str:
    """What an interrupted run leaves in ``run_dir``, and how to go on from it. A run that wrote nothing worth
    resuming (no trained teacher, no resume state of either phase) removes what it wrote (rank 0, which knows
    what ``found`` was there before it); the run-directory lock then removes the directory if the run created it."""
    if (any((run_dir / name).is_file() for name in (RESUME_FILE, TEACHER_FILE))
            or _saved_step(run_dir / TEACHER_RESUME_FILE)):
        files = sorted(p.name for p in run_dir.iterdir() if p.is_file() and not p.name.startswith("."))
        return (f"{str(run_dir)!r} keeps {', '.join(files)}; --resume continues from there once the cause is fixed "
                "(with the same options)")
    if found is not None and run_dir.is_dir():
        for path in set(run_dir.iterdir()) - found - {run_dir / LOCK_FILE}:
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    return f"nothing trained was kept, so the run's files in {str(run_dir)!r} were removed"


def _saved_step(resume_file: Path) -> int:
    """The step a phase's resume state was saved after (0: none, or the phase's start only)."""
    try:
        with safe_open(str(resume_file), framework="pt") as fh:
            return int(json.loads((fh.metadata() or {})["position"])["step"])
    except (OSError, ValueError, KeyError, TypeError, SafetensorError):
        return 0


def _student_phase(run: RunContext, plan: StepPlan, teacher_source: str, teacher_speed: float | None, graphs: bool,
                   show: bool, started: float) -> dict[str, Any]:
    """The student's phase of the run loop (:mod:`.phases`): a :class:`jacplug.Distiller` step, resumable."""
    config, runtime, splits, run_dir, teacher = run.config, run.runtime, run.splits, run.out_dir, run.teacher
    # a --teacher-checkpoint trained on other statistics sees the run's tensors renormalised to its own
    view = teacher_view(config.teacher_checkpoint, splits.mean, splits.std)
    view = view.to(runtime.device) if view is not None else None
    seen = teacher if view is None else nn.Sequential(view, teacher).eval()  # the teacher as the data reaches it
    teacher_acc = accuracy(seen, splits.test, runtime, batch_size=config.eval_batch_size, show=show, desc="teacher test")
    run.extra.update(teacher_acc=teacher_acc, teacher_source=teacher_source)
    phase = Phase(kind="student", name="student", out_dir=run_dir, group=str(run_dir), params=config.to_dict(),
                  plan=plan)
    batches = StreamBatches(Indexed(splits.train), plan, config.batch_size, config.seed, config.workers,
                            pin_memory=runtime.device.type == "cuda", rank=runtime.rank, world_size=runtime.world_size)
    built = build_student_phase(run, phase, batches, capture=graphs, fused=runtime.device.type == "cuda", show=show,
                                resume_file=run_dir / RESUME_FILE, resume=bool(config.resume),
                                cache_path=run_dir / CACHE_FILE if config.cache_teacher else None,
                                checkpoints={"best": run_dir / BEST_FILE, "last": run_dir / LAST_FILE},
                                teacher_input=view)
    end_teacher_resume(run_dir, runtime)  # the student phase has saved its start: a resumed run begins there
    student, loop, events, heldout = run.student, built.loop, built.events, built.heldout
    position = loop.position
    evaluations = [r for r in read_metrics(run_dir) if r.get("kind") == "epoch"] if runtime.is_main else []
    events.emit("on_train_start")
    if heldout is not None:
        heldout.start(student)
    last = loop.run(last=evaluations[-1] if evaluations else None)
    if heldout is not None:
        picture = heldout.picture(student, run_dir / GRADIENT_MAPS)
        events.emit("on_image", name="gradient_maps", path=picture, step=position.step)

    summary = _summary(config, run_dir, teacher_acc, teacher_source, position, last, started, splits, plan)
    summary["student_images_per_s"] = loop.images_per_s
    summary["teacher_images_per_s"] = teacher_speed
    summary["student_step_mode"] = built.distiller.capture_status
    summary["agreement"] = {k: v for k, v in last.items() if k.startswith("agreement_")}
    if heldout is not None:
        summary["gradient_maps"] = str(run_dir / GRADIENT_MAPS)
    events.emit("on_train_end", summary=summary)
    return summary


def _summary(config, run_dir, teacher_acc, teacher_source, position, last, started, splits, plan) -> dict[str, Any]:
    """Accuracies (test split), the training length, final per-term losses (means since the previous
    evaluation), time, file locations."""
    best = position.best
    terms = {k: v for k, v in last.items() if k not in ("kind", "epoch", "step", "images", "time_s")
             and not k.endswith("_acc") and not k.startswith("agreement_")}
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
        "dropped_images": list(splits.dropped_images),
        "time_s": time.perf_counter() - started,
        "run_dir": str(run_dir),
        # only files that exist: a run whose evaluations have no score writes no best checkpoint
        "checkpoints": {role: str(path) for role, path in (("teacher", Path(teacher_file)),
                        ("student_best", run_dir / BEST_FILE), ("student_last", run_dir / LAST_FILE))
                        if path.is_file()},
    }
