"""Every ``jacplug train`` option in one dataclass, loadable from YAML or TOML.

Precedence: dataclass defaults < ``--config FILE`` < command-line flags. A config file uses the
option names with dashes or underscores (``batch-size`` or ``batch_size``); ``loss`` is a list of
``NAME=WEIGHT[:opt=val,...]`` strings, as on the command line; ``student-kwargs`` and
``teacher-kwargs`` are mappings or ``key=value,...`` text (see :mod:`.model_options`), merged key by
key with the flags. Unknown keys are an error (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import UserError, close_matches
from .model_options import merge_options, model_options

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: the same parser, published as the tomli distribution
    import tomli as tomllib


#: the largest --image-size: one 4096 px image's activations and their double backward exceed a GPU's memory
MAX_IMAGE_SIZE = 4096


@dataclass
class TrainConfig:
    """The resolved options of one run; saved as ``config.json`` in the run directory."""

    teacher: str = "resnet50"
    student: str = "resnet18"
    teacher_kwargs: dict[str, Any] = field(default_factory=dict)  # model constructor kwargs (img_size: automatic)
    student_kwargs: dict[str, Any] = field(default_factory=dict)
    dataset: str = "digits"
    data_root: str | None = None
    download: bool = False
    samples_per_class: int | None = None
    image_size: int | None = None  # None: the dataset's default (digits 16, CIFAR 32, imagefolder 64)
    augment: bool | None = None  # None: the dataset's default (off for digits, on for CIFAR/imagefolder)
    loss: list[str] = field(default_factory=list)  # empty: the default preset
    epochs: int | None = None  # epochs or steps; neither: see jacplug.pipeline.steps.default_length
    steps: int | None = None  # total optimizer steps of the student
    batch_size: int = 64
    lr: float = 2e-3
    weight_decay: float = 0.05
    seed: int = 0
    device: str = "auto"
    out: str | None = None
    resume: bool = False
    teacher_checkpoint: str | None = None
    pretrained: bool = False
    teacher_epochs: int | None = None  # teacher_epochs or teacher_steps; neither: 4 epochs
    teacher_steps: int | None = None
    teacher_lr: float = 2e-3
    cache_teacher: bool = False
    check_gradients: bool = True
    save_every: int = 50  # steps between mid-epoch checkpoints (0: only at epoch ends)
    eval_batch_size: int = 256
    workers: int = 0
    max_steps_per_epoch: int | None = None  # cap, for smoke tests and benchmarks
    progress: bool | None = None  # None: progress bars only when stderr is a terminal
    cuda_graphs: str = "auto"  # auto: capture the step in a CUDA graph on a single CUDA device; on; off

    def validate(self) -> "TrainConfig":
        """Reject values no run could use, with the option name in the message."""
        for name in ("epochs", "steps", "teacher_steps", "batch_size", "eval_batch_size"):
            value = getattr(self, name)
            if value is not None and int(value) <= 0:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
        if self.teacher_epochs is not None and self.teacher_epochs < 0:
            raise UserError(f"--teacher-epochs must be >= 0, got {self.teacher_epochs}")
        for epochs, steps in LENGTHS:
            if getattr(self, epochs) is not None and getattr(self, steps) is not None:
                raise UserError(f"--{_flag(epochs)} and --{_flag(steps)} both set the training length; pass one")
        if self.workers < 0:
            raise UserError(f"--workers must be >= 0, got {self.workers}")
        for name in ("lr", "teacher_lr"):
            value = float(getattr(self, name))
            if not (value > 0 and value < float("inf")):
                raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
        if self.weight_decay < 0:
            raise UserError(f"--weight-decay must be >= 0, got {self.weight_decay}")
        if self.samples_per_class is not None and self.samples_per_class <= 0:
            raise UserError(f"--samples-per-class must be a positive integer, got {self.samples_per_class}")
        if self.image_size is not None and self.image_size <= 0:
            raise UserError(f"--image-size must be a positive integer, got {self.image_size}")
        if self.image_size is not None and self.image_size > MAX_IMAGE_SIZE:
            raise UserError(f"--image-size {self.image_size} is larger than {MAX_IMAGE_SIZE} px, beyond what a "
                            "training batch with a double backward fits in memory; use a smaller size")
        if self.save_every < 0:
            raise UserError(f"--save-every must be >= 0, got {self.save_every}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch <= 0:
            raise UserError(f"--max-steps-per-epoch must be a positive integer, got {self.max_steps_per_epoch}")
        if self.device not in ("auto", "cpu", "cuda") and not self.device.startswith("cuda:"):
            raise UserError(f"--device must be auto, cpu or cuda (or cuda:N), got {self.device!r}")
        if self.cuda_graphs not in ("auto", "on", "off"):
            raise UserError(f"--cuda-graphs must be auto, on or off, got {self.cuda_graphs!r}")
        if self.pretrained and self.teacher_checkpoint:
            raise UserError("--pretrained and --teacher-checkpoint both choose the teacher's weights; pass one")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

#: the two ways to give a phase's length; a flag for one replaces the file's value of the other
LENGTHS = (("epochs", "steps"), ("teacher_epochs", "teacher_steps"))


def _flag(name: str) -> str:
    return name.replace("_", "-")


def read_config_file(path: str | Path) -> dict[str, Any]:
    """Options from a ``.yaml``/``.yml``/``.toml``/``.json`` file, keys normalised to field names."""
    options: dict[str, Any] = {}
    for key, value in read_mapping(path).items():
        name = str(key).replace("-", "_")
        if name not in FIELDS:
            near = close_matches(name.replace("_", "-"), [f.replace("_", "-") for f in FIELDS])
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise UserError(f"config file {str(path)!r}: unknown option {key!r}{hint}")
        if name == "loss" and isinstance(value, str):
            value = [value]
        options[name] = value
    return options


def read_mapping(path: str | Path) -> dict[str, Any]:
    """The top-level mapping of a ``.yaml``/``.yml``/``.toml``/``.json`` file, with one-line errors
    for a missing file, an unknown format, a parse error or a file that holds no mapping."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"config file {str(path)!r} does not exist")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise UserError(f"config file {str(path)!r}: expected a .yaml, .yml, .toml or .json file")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as exc:
        raise UserError(f"config file {str(path)!r} could not be parsed: {exc}") from exc
    except Exception as exc:  # yaml.YAMLError, without importing yaml at module level
        if type(exc).__module__.startswith("yaml"):
            raise UserError(f"config file {str(path)!r} could not be parsed: {' '.join(str(exc).split())}") from exc
        raise
    if not isinstance(data, dict):
        raise UserError(f"config file {str(path)!r} must hold a mapping of option names to values")
    return data


def _check_type(name: str, value: Any) -> None:
    """Values from a file may have any type; the message names the option and what it must be."""
    if value is None:
        return
    expected = str(FIELDS[name].type)
    if name == "loss":
        ok, what = isinstance(value, list) and all(isinstance(v, str) for v in value), "a list of NAME=WEIGHT strings"
    elif expected.startswith("dict"):
        ok, what = isinstance(value, dict), "a mapping of keyword arguments"
    elif expected.startswith("bool"):
        ok, what = isinstance(value, bool), "true or false"
    elif expected.startswith("int"):
        ok, what = isinstance(value, int) and not isinstance(value, bool), "an integer"
    elif expected.startswith("float"):
        ok, what = isinstance(value, (int, float)) and not isinstance(value, bool), "a number"
    else:
        ok, what = isinstance(value, str), "a string"
    if not ok:
        raise UserError(f"option {name!r} must be {what}, got {value!r}")


def resolve(file_options: dict[str, Any], cli_options: dict[str, Any]) -> TrainConfig:
    """Defaults, then the file, then every CLI option the user actually gave (not ``None``). Without a
    ``teacher``, a ``teacher_checkpoint`` that records its model names the teacher."""
    given = {k for k, v in cli_options.items() if v is not None}
    replaced = {other for pair in LENGTHS for name, other in (pair, pair[::-1]) if name in given}
    file_side = {k: v for k, v in file_options.items() if k not in replaced}
    merged = merge_options(file_side, {k: v for k, v in cli_options.items() if k in FIELDS})
    if "teacher" not in merged and merged.get("teacher_checkpoint"):  # the checkpoint says which model it holds
        from .checkpoint import checkpoint_model_name

        recorded = checkpoint_model_name(merged["teacher_checkpoint"])
        if recorded:
            merged["teacher"] = recorded
    for name, value in merged.items():
        _check_type(name, value)
    return TrainConfig(**merged).validate()


#: options that define what a run computes; ``--resume`` refuses to change them
IDENTITY = ("teacher", "student", "dataset", "samples_per_class", "image_size", "augment", "loss", "batch_size",
            "lr", "weight_decay", "seed", "teacher_checkpoint", "pretrained", "teacher_epochs", "teacher_steps",
            "cache_teacher", "teacher_kwargs", "student_kwargs")
#: options that set the length of the student's cosine schedule; ``--resume`` refuses to change them too
HORIZON = ("epochs", "steps", "max_steps_per_epoch")


def _saved_length(saved: dict[str, Any]) -> str:
    given = [f"--{_flag(k)} {saved[k]}" for k in HORIZON if saved.get(k) is not None]
    return " ".join(given) or "the default length"


def for_resume(saved: dict[str, Any], overrides: dict[str, Any], run_dir: str) -> TrainConfig:
    """The saved config of ``run_dir`` with ``overrides`` (options given again on the command line).

    Options in :data:`IDENTITY` must keep their saved values (a different loss or seed would not
    continue the same run), and so must the length (:data:`HORIZON`): the learning rate follows a
    cosine that reaches zero at the saved last step, so another length would make it jump mid-run.
    Others (``device``, ``save_every``, ``workers``, progress) may change.
    """
    overrides = model_options({k: v for k, v in overrides.items() if v is not None})
    length = [k for k in HORIZON if overrides.get(k) is not None and overrides[k] != saved.get(k)]
    if length:
        given = " ".join(f"--{_flag(k)} {overrides[k]}" for k in length)
        raise UserError(
            f"--resume cannot change the training length of the run in {run_dir!r} ({given}; saved: "
            f"{_saved_length(saved)}): its learning rate decays to zero over the saved length; drop {given}, "
            "or start a new run with another --out (--teacher-checkpoint reuses its teacher)"
        )
    changed = [
        f"--{_flag(k)} {overrides[k]!r} (saved: {saved.get(k)!r})"
        for k in IDENTITY
        if overrides.get(k) is not None and overrides[k] != saved.get(k)
    ]
    if changed:
        raise UserError(
            f"--resume continues the run in {run_dir!r} with its saved options, but these differ: {'; '.join(changed)}; "
            "drop them, or start a new run with another --out"
        )
    unknown = [k for k in saved if k not in FIELDS]
    if unknown:
        raise UserError(f"{run_dir!r}/config.json has unknown options {unknown}; was it written by another jacplug version?")
    options = {**saved, **{k: v for k, v in overrides.items() if v is not None and k in FIELDS}}
    options["resume"], options["out"] = True, run_dir
    return resolve({}, options)
