"""What an experiment is: its options (:class:`ExperimentConfig`, recorded in the results JSON) and one
student run of its grid (:class:`RunSpec`). Kept apart from the protocol (:mod:`.protocol`) and the methods
(:mod:`.methods`), which both read them, so neither imports the other."""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import UserError
from ..config_fields import option
from ..training.config import FIELDS as TRAIN_FIELDS, MAX_COUNT, MAX_SEED, TrainConfig, check_device, resume_item, resume_mode
from ..specs import kwargs_option
from .methods import FEW_SHOT_METHODS, METHODS, get_method


def sample_size(text: str) -> int | None:
    """One sample size from the command line: ``"all"`` -> ``None`` (every training image), else an integer."""
    if text.strip().lower() == "all":
        return None
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None


def _sizes(values: list) -> list[int | None]:
    """Sample sizes from a flag or a file: integers, ``"all"`` or null."""
    try:
        return [sample_size(v) if isinstance(v, str) else v for v in values]
    except argparse.ArgumentTypeError as exc:
        raise UserError(f"samples per class: {exc}") from None


def _seed_count(first: int, flag: str) -> Callable[[Any], list[int]]:
    """A number of seeds ``N`` (flag or file) -> ``[first, ..., first + N - 1]``; a list stays as it is."""

    def convert(value: Any) -> list[int]:
        if isinstance(value, int) and not isinstance(value, bool):
            if value <= 0:
                raise UserError(f"{flag} must be a positive integer, got {value}")
            return list(range(first, first + value))
        return value

    return convert


def _kwargs(value: Any) -> dict[str, Any]:
    return kwargs_option(value, "--student-kwargs")


#: where an experiment's defaults differ from ``jacplug train``'s: a grid of many short runs wants small models,
#: a fixed step budget per cell, smaller batches for few samples, a longer-trained teacher and bigger
#: evaluation batches (many evaluations, no training in them)
EXPERIMENT_DEFAULTS: dict[str, Any] = {"teacher": "resnet10t", "student": "test_resnet", "teacher_epochs": 10,
                                       "steps": 100, "batch_size": 32, "eval_batch_size": 512,
                                       "out": "runs/few-shot"}


def from_train(name: str, **changes: Any) -> Any:
    """``jacplug train``'s option ``name`` (:class:`TrainConfig`'s field: help, flag settings, default) as an
    experiment option, so no default or help is written twice; the default is :data:`EXPERIMENT_DEFAULTS`'
    where the experiment differs; ``changes`` replace flag settings (its ``--help`` group, a converter)."""
    field = TRAIN_FIELDS[name]
    settings = {**field.metadata, **changes}
    if name in EXPERIMENT_DEFAULTS:
        return option(EXPERIMENT_DEFAULTS[name], **settings)
    return option(field.default, default_factory=field.default_factory, **settings)


@dataclass
class ExperimentConfig:
    """Every option of the experiment (recorded in the results JSON). ``samples_per_class``: ``None``
    stands for all training images. Each field is also the ``jacplug experiment`` flag and config-file
    key of the same name (:mod:`jacplug.config_fields`)."""

    dataset: str = from_train("dataset", group="data and models")
    data_root: str | None = from_train("data_root", group="data and models")
    download: bool = from_train("download", group="data and models")
    image_size: int | None = from_train("image_size", group="data and models")
    teacher: str = from_train("teacher", group="data and models")
    student: str = from_train("student", group="data and models")
    student_kwargs: dict[str, Any] = from_train("student_kwargs", convert=_kwargs, group="data and models")
    teacher_checkpoint: str | None = from_train("teacher_checkpoint", group="data and models")
    teacher_epochs: int = from_train("teacher_epochs", group="data and models",
                                     help="epochs to train the teacher when no --teacher-checkpoint is given")
    teacher_lr: float = from_train("teacher_lr", group="data and models")
    samples_per_class: list[int | None] = option(default_factory=lambda: [1, 5, 10, 50, None], metavar="N",
                                                 item=sample_size, convert=_sizes, group="grid",
                                                 help="student training images per class; 'all' = the whole split")
    methods: list[str] = option(default_factory=lambda: list(FEW_SHOT_METHODS), metavar="METHOD",
                                choices=tuple(METHODS), group="grid", help=f"any of {', '.join(METHODS)}")
    seeds: list[int] = option(default_factory=lambda: [0, 1, 2, 3, 4], metavar="N", single=True,
                              convert=_seed_count(0, "--seeds"), group="grid",
                              help="N seeds per cell, 0..N-1 (a config file may also list them)")
    steps: int = from_train("steps", group="grid",
                             help="student optimizer steps of every cell (cells run a fixed number of steps, not "
                                  "epochs)")
    batch_size: int = from_train("batch_size", group="grid")
    lr: float = from_train("lr", group="grid")
    weight_decay: float = from_train("weight_decay", group="grid")
    temperature: float = option(4.0, group="grid", help="KD temperature")
    attention_layers: str = option("layer1+layer2", group="grid",
                                   help="attention transfer layers (the same names in both models)")
    jacobian_weights: list[float] = option(default_factory=lambda: [0.1, 0.3, 1.0, 3.0, 10.0], metavar="W",
                                           group="selection on the validation split",
                                           help="grid for the Jacobian, projected-Jacobian and preset weights")
    attention_weights: list[float] = option(default_factory=lambda: [1.0, 10.0, 30.0], metavar="W",
                                            group="selection on the validation split",
                                            help="grid for the attention weight")
    noisy_weights: list[float] = option(default_factory=lambda: [0.01, 0.1, 1.0], metavar="W",
                                        group="selection on the validation split",
                                        help="grid for the noisy-input distillation weight")
    noisy_sigma: float = option(0.2, group="selection on the validation split",
                                help="training noise of kd+noisy, in units of the pixel std")
    select_at: list[int | None] = option(default_factory=lambda: [5, 50], metavar="N", item=sample_size,
                                         convert=_sizes, group="selection on the validation split",
                                         help="sample sizes at which weights are chosen")
    select_seeds: list[int] = option(default_factory=lambda: [1000], metavar="N", single=True,
                                     convert=_seed_count(1000, "--select-seeds"), group="selection on the validation split",
                                     help="N seeds 1000..1000+N-1 per grid point; the best mean wins")
    select_on: str = option("clean", choices=("clean", "noise"), group="selection on the validation split",
                            help="validation score: clean accuracy, or the mean over --noise-sigmas")
    noise_sigmas: list[float] = option(default_factory=list, metavar="SIGMA", group="robustness",
                                       help="also score val/test accuracy with additive Gaussian input noise of "
                                            "these std (units of the pixel std; 0 = clean); writes noise.png")
    noise_seed: int = option(0, group="robustness", help="seed of the scoring noise")
    device: str = from_train("device", group="execution")
    workers: int = option(2, group="execution",
                         help="processes running cells on CPU (CUDA: one per device, see --devices); the "
                              "data-loader processes of each cell are --loader-workers")
    threads: int = option(1, group="execution", help="torch threads per process")
    loader_workers: int | None = option(None, group="execution",
                                        help="data-loader processes of each cell, as `jacplug train --workers` "
                                             "(none: 0 on CPU, 4 on CUDA)")
    eval_batch_size: int = from_train("eval_batch_size", group="execution")
    agreement_images: int = from_train("agreement_images", group="execution")
    out: str = from_train("out", group="execution", metavar="DIR",
                         help="experiment directory: results, report, figures and one directory per cell")
    log: list[str] = from_train("log")
    log_off: list[str] = from_train("log_off")
    resume: bool | str = option(False, const=True, metavar="auto", item=resume_item, convert=resume_mode,
                                group="execution",
                                help="run only the unfinished cells of the interrupted experiment in --out, reusing "
                                     "its teacher; '--resume auto': continue it if --out holds one, else start")
    devices: str | None = option(None, metavar="all|cuda:N,...", group="execution",
                                 help="CUDA devices the cells spread over, one worker process each (none: every "
                                      "visible GPU, or the one --device cuda:N names)")
    executor: str = option("local", choices=("local", "ray"), group="execution",
                           help="local: this machine's processes; ray: each cell a Ray task (pip install "
                                "'jacplug[ray]')")
    ray_address: str | None = option(None, metavar="HOST:PORT", group="execution",
                                     help="a running Ray cluster (none: a local Ray instance)")
    retries: int = option(2, group="execution",
                          help="--executor ray: times a cell whose worker died is run again")

    def validate(self) -> "ExperimentConfig":
        check_device(self.device)
        for name in ("steps", "batch_size", "teacher_epochs", "workers", "threads", "eval_batch_size"):
            if not 0 < int(getattr(self, name)) <= MAX_COUNT:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer up to {MAX_COUNT}, "
                                f"got {getattr(self, name)}")
        if self.batch_size < 2:
            raise UserError(f"--batch-size must be at least 2 (train-mode BatchNorm cannot normalise a single "
                            f"sample), got {self.batch_size}")
        for name in ("lr", "teacher_lr", "temperature"):
            if not 0 < float(getattr(self, name)) < math.inf:
                raise UserError(f"--{name.replace('_', '-')} must be a finite number > 0, got {getattr(self, name)}")
        if not 0 <= self.weight_decay < math.inf:
            raise UserError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        for name, seeds in (("--seeds", self.seeds), ("--select-seeds", self.select_seeds),
                            ("--noise-seed", [self.noise_seed])):
            if any(not 0 <= seed <= MAX_SEED for seed in seeds):
                raise UserError(f"{name} must be integers from 0 to {MAX_SEED} (64 bits), got {seeds}")
            if len(set(seeds)) != len(seeds):
                repeated = sorted({seed for seed in seeds if seeds.count(seed) > 1})
                raise UserError(f"{name} lists seed(s) {repeated} more than once; each seed is one independent "
                                "run, so list each once")
        if not str(self.out).strip():
            raise UserError("--out is empty; pass the experiment's output directory")
        if self.teacher_checkpoint:
            defaults = {f.name: f.default for f in dataclasses.fields(self)}
            ignored = [f"--{name.replace('_', '-')}" for name in ("teacher_epochs", "teacher_lr")
                       if getattr(self, name) != defaults[name]]
            if ignored:
                raise UserError(f"{' and '.join(ignored)} set how the teacher is trained, but --teacher-checkpoint "
                                "gives a trained one; drop one of them")
        if self.agreement_images < 0:
            raise UserError(f"--agreement-images must be >= 0 (0 switches the measurement off), got "
                            f"{self.agreement_images}")
        if self.loader_workers is not None and self.loader_workers < 0:
            raise UserError(f"--loader-workers must be >= 0, got {self.loader_workers}")
        if not self.seeds or not self.samples_per_class or not self.methods:
            raise UserError("need at least one seed, one --samples-per-class value and one method")
        for name in self.methods:
            get_method(name)
        for grid_name in ("jacobian_weights", "attention_weights", "noisy_weights"):
            if not getattr(self, grid_name) or any(not (w > 0 and math.isfinite(w)) for w in getattr(self, grid_name)):
                raise UserError(f"--{grid_name.replace('_', '-')} must be finite weights > 0")
        if not self.select_at or not self.select_seeds:
            raise UserError("--select-at and --select-seeds need at least one value each")
        if set(self.select_seeds) & set(self.seeds):
            raise UserError(f"selection seeds {self.select_seeds} overlap the reported seeds {self.seeds}; "
                            "weights must be chosen on runs that are not reported")
        if any(not (s >= 0 and math.isfinite(s)) for s in self.noise_sigmas):
            raise UserError(f"--noise-sigmas must be finite and >= 0, got {self.noise_sigmas}")
        if self.select_on not in ("clean", "noise"):
            raise UserError(f"--select-on must be clean or noise, got {self.select_on!r}")
        if self.select_on == "noise" and not self.noise_sigmas:
            raise UserError("--select-on noise needs --noise-sigmas")
        if not (self.noisy_sigma > 0 and math.isfinite(self.noisy_sigma)):
            raise UserError(f"--noisy-sigma must be finite and > 0, got {self.noisy_sigma}")
        for n in [*self.samples_per_class, *self.select_at]:
            if n is not None and n <= 0:
                raise UserError(f"samples per class must be positive integers or 'all', got {n}")
        if self.executor not in ("local", "ray"):
            raise UserError(f"--executor must be local or ray, got {self.executor!r}")
        if self.ray_address is not None and self.executor != "ray":
            raise UserError("--ray-address needs --executor ray")
        if self.devices is not None and self.executor == "ray":
            raise UserError("--devices chooses this machine's GPUs; with --executor ray, Ray places each cell "
                            "on a GPU of the cluster")
        if self.retries < 0:
            raise UserError(f"--retries must be >= 0, got {self.retries}")
        resume_mode(self.resume)
        return self

    def train_config(self, **replaced: Any) -> TrainConfig:
        """The ``jacplug train`` configuration every cell starts from (the options the two commands share), with
        ``replaced`` fields: a cell is this with its seed, sample size and loss."""
        shared = {name: getattr(self, name) for name in SHARED}
        return dataclasses.replace(TrainConfig(**shared), **replaced)

    def grid(self, key: str) -> list[float]:
        """The weights tried for ``key``; ``jacobian``, ``projected`` and ``preset`` share one grid."""
        return {"attention": self.attention_weights, "noisy": self.noisy_weights}.get(key, self.jacobian_weights)


#: options named like ``jacplug train``'s that mean something else in an experiment: a list of sample sizes,
#: processes running cells, resuming a grid
OWN_MEANING = ("samples_per_class", "workers", "resume")
#: the options an experiment shares with ``jacplug train`` (its cells are ``jacplug train`` runs)
SHARED = tuple(name for name in (f.name for f in dataclasses.fields(ExperimentConfig))
               if name in TRAIN_FIELDS and name not in OWN_MEANING)


@dataclass(frozen=True)
class RunSpec:
    """One student run. ``phase``: ``"select"`` (validation only) or ``"main"``."""

    method: str
    samples_per_class: int | None
    seed: int
    weights: tuple[tuple[str, float], ...]
    phase: str = "main"

    @property
    def name(self) -> str:
        """The cell's id, unique in an experiment and a file name: phase, method, sample size, seed and weights
        (``repr``: exact), e.g. ``main-kd+jacobian-n5-seed0-jacobian=1.0``."""
        size = "all" if self.samples_per_class is None else self.samples_per_class
        weights = "".join(f"-{key}={weight!r}" for key, weight in self.weights)
        return f"{self.phase}-{self.method}-n{size}-seed{self.seed}{weights}"
