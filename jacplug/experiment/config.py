"""What an experiment is: its options (:class:`ExperimentConfig`, recorded in the results JSON) and one
student run of its grid (:class:`RunSpec`). Kept apart from the protocol (:mod:`.protocol`) and the methods
(:mod:`.methods`), which both read them, so neither imports the other."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ..errors import UserError
from ..pipeline.device import check_device
from .methods import FEW_SHOT_METHODS, get_method


@dataclass
class ExperimentConfig:
    """Every option of the experiment (recorded in the results JSON). ``samples_per_class``: ``None``
    stands for all training images."""

    dataset: str = "digits"
    data_root: str | None = None
    download: bool = False
    image_size: int | None = None
    teacher: str = "resnet10t"
    student: str = "test_resnet"
    student_kwargs: dict[str, Any] = field(default_factory=dict)  # timm constructor kwargs (img_size: automatic)
    teacher_checkpoint: str | None = None
    teacher_epochs: int = 10
    teacher_lr: float = 2e-3
    samples_per_class: list[int | None] = field(default_factory=lambda: [1, 5, 10, 50, None])
    methods: list[str] = field(default_factory=lambda: list(FEW_SHOT_METHODS))
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3, 4])
    steps: int = 100
    batch_size: int = 32
    lr: float = 2e-3
    weight_decay: float = 0.05
    temperature: float = 4.0
    attention_layers: str = "layer1+layer2"
    jacobian_grid: list[float] = field(default_factory=lambda: [0.1, 0.3, 1.0, 3.0, 10.0])
    attention_grid: list[float] = field(default_factory=lambda: [1.0, 10.0, 30.0])
    noisy_grid: list[float] = field(default_factory=lambda: [0.01, 0.1, 1.0])
    noisy_sigma: float = 0.2
    select_at: list[int | None] = field(default_factory=lambda: [5, 50])
    select_seeds: list[int] = field(default_factory=lambda: [1000])
    select_on: str = "clean"
    noise_sigmas: list[float] = field(default_factory=list)
    noise_seed: int = 0
    device: str = "auto"
    workers: int = 2
    threads: int = 1
    loader_workers: int | None = None  # None: 0 on CPU, 4 on CUDA (see loader_workers())
    eval_batch_size: int = 512
    out: str = "runs/few-shot"

    def validate(self) -> "ExperimentConfig":
        check_device(self.device)
        for name in ("steps", "batch_size", "teacher_epochs", "workers", "threads"):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(self, name)}")
        if self.loader_workers is not None and self.loader_workers < 0:
            raise UserError(f"--loader-workers must be >= 0, got {self.loader_workers}")
        if not self.seeds or not self.samples_per_class or not self.methods:
            raise UserError("need at least one seed, one --samples-per-class value and one method")
        for name in self.methods:
            get_method(name)
        for grid_name in ("jacobian_grid", "attention_grid", "noisy_grid"):
            if not getattr(self, grid_name) or any(not (w > 0 and math.isfinite(w)) for w in getattr(self, grid_name)):
                raise UserError(f"--{grid_name.replace('_grid', '-weights')} must be finite weights > 0")
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
        return self

    def grid(self, key: str) -> list[float]:
        """The weights tried for ``key``; ``jacobian``, ``projected`` and ``preset`` share one grid."""
        return {"attention": self.attention_grid, "noisy": self.noisy_grid}.get(key, self.jacobian_grid)


@dataclass(frozen=True)
class RunSpec:
    """One student run. ``phase``: ``"select"`` (validation only) or ``"main"``."""

    method: str
    samples_per_class: int | None
    seed: int
    weights: tuple[tuple[str, float], ...]
    phase: str = "main"
