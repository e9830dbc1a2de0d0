"""Every ``jacplug train`` option in one dataclass, loadable from YAML, TOML or JSON.

Precedence: dataclass defaults < ``--config FILE`` < command-line flags. A config file uses the
option names with dashes or underscores (``batch-size`` or ``batch_size``); ``loss`` is a list of
``NAME=WEIGHT[:opt=val,...]`` strings, as on the command line; ``student-kwargs`` and
``teacher-kwargs`` are mappings or ``key=value,...`` text (see :mod:`jacplug.specs`), merged key by
key with the flags. Unknown keys are an error (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import typing

from ..errors import UserError
from ..config_fields import check_value, option, read_options
from ..specs import merge_options, model_options


#: the largest count option (steps, epochs, batch sizes): the loops index with 64-bit integers
MAX_COUNT = 2**63 - 1
#: the largest --seed: torch's generators take 64 bits
MAX_SEED = 2**64 - 1

#: the resize filters timm's transforms take by name (--interpolation)
INTERPOLATIONS = ("bilinear", "bicubic", "nearest", "lanczos", "box", "hamming")

#: the largest --image-size: one 4096 px image's activations and their double backward exceed a GPU's memory
MAX_IMAGE_SIZE = 4096


def check_device(requested: str) -> None:
    """A one-line :class:`UserError` unless ``requested`` is ``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if requested in ("auto", "cpu", "cuda") or re.fullmatch(r"cuda:\d+", str(requested)):
        return
    raise UserError(f"--device {requested!r} is not a device jacplug runs on; use auto, cpu, cuda or cuda:N")


def resume_mode(value: Any) -> bool | str:
    """``--resume`` (``True``), ``--resume auto`` or a config file's ``resume: true | false | auto``.

    ``auto`` continues the run (or experiment) in ``--out`` when there is one and starts one when there
    is none: the flag a restarted worker needs (``torchrun --max-restarts``, a rescheduled job), since it
    cannot know whether an earlier attempt left something to continue."""
    if isinstance(value, bool) or value == "auto":
        return value
    if isinstance(value, str) and value.strip().lower() in ("auto", "true", "false"):
        return {"auto": "auto", "true": True, "false": False}[value.strip().lower()]
    raise UserError(f"--resume takes no value or 'auto', got {value!r}")


def resume_item(text: str) -> bool | str:
    """One ``--resume`` value from the command line (argparse's ``type``): only ``auto``."""
    import argparse

    if text.strip().lower() != "auto":
        raise argparse.ArgumentTypeError(f"expected nothing or 'auto', got {text!r}")
    return "auto"


def check_preprocessing(config: Any) -> None:
    """One-line refusals for preprocessing options no run could use: a crop fraction outside (0, 1], a
    probability outside [0, 1], a range that is not two increasing positive numbers, and augmentation
    options with augmentation switched off (``--no-augment``, which the teacher cache needs)."""
    if config.crop_pct is not None and not 0 < config.crop_pct <= 1:
        raise UserError(f"--crop-pct must be a fraction in (0, 1], got {config.crop_pct}")
    if not 0 <= config.reprob <= 1:
        raise UserError(f"--reprob must be a probability from 0 to 1, got {config.reprob}")
    for name in ("scale", "ratio"):
        value = getattr(config, name)
        if value is not None and not (len(value) == 2 and 0 < value[0] <= value[1] < float("inf")):
            raise UserError(f"--{name} takes two numbers LO HI with 0 < LO <= HI, got {' '.join(map(str, value))}")
    if config.dataset == "digits":
        given = [f"--{name.replace('_', '-')}" for name in ("interpolation", "crop_pct", "aa", "reprob", "scale", "ratio")
                 if getattr(config, name)]
        if given:
            raise UserError(f"{' and '.join(given)} set how CIFAR and image folders are resized and augmented; the "
                            "embedded digits keep their own tensors (--augment shifts them): drop "
                            f"{'them' if len(given) > 1 else 'it'}")
    given = [f"--{name}" for name in ("aa", "reprob", "scale", "ratio") if getattr(config, name)]
    if given and config.augment is False:
        raise UserError(f"{' and '.join(given)} augment training images, but --no-augment switches augmentation off; "
                        "drop one of them")


@dataclass
class TrainConfig:
    """The resolved options of one run; saved as ``config.json`` in the run directory. Each field is also
    the ``jacplug train`` flag and config-file key of the same name (:mod:`jacplug.config_fields`)."""

    teacher: str = option("resnet50", metavar="NAME[:KEY=VALUE,...]", group="models",
                          help="teacher model name (any timm name), optionally with constructor kwargs")
    student: str = option("resnet18", metavar="NAME[:KEY=VALUE,...]", group="models",
                          help="student model name (any timm name), optionally with constructor kwargs, e.g. "
                               "vit_tiny_patch16_224:patch_size=4,depth=6")
    teacher_kwargs: dict[str, Any] = option(default_factory=dict, metavar="KEY=VALUE,...", group="models",
                                            help="keyword arguments for the teacher's constructor (values read as "
                                                 "Python/YAML literals: docs/pipeline.md, Specs); img_size follows "
                                                 "--image-size for models that take it")
    student_kwargs: dict[str, Any] = option(default_factory=dict, metavar="KEY=VALUE,...", group="models",
                                            help="keyword arguments for the student's constructor")
    dataset: str = option("digits", group="data",
                          help="digits (embedded), cifar10, cifar100, imagefolder:PATH, or a plugin's dataset")
    data_root: str | None = option(None, group="data", help="where torchvision datasets live (none: ./data)")
    download: bool = option(False, group="data", help="download a torchvision dataset (needs internet)")
    samples_per_class: int | None = option(None, metavar="N", group="data",
                                           help="train the student on N images per class (seeded; none: all)")
    image_size: int | None = option(None, metavar="PX", group="data",
                                    help="input size (none: the dataset's, digits 16, CIFAR 32, imagefolder 64)")
    interpolation: str | None = option(None, choices=INTERPOLATIONS, group="preprocessing",
                                       help="resize filter (none: the student's timm data configuration, e.g. "
                                            "bicubic; bilinear for a model that declares none)")
    crop_pct: float | None = option(None, metavar="FRACTION", group="preprocessing",
                                    help="evaluation centre crop: resize to --image-size / FRACTION, keep the centre "
                                         "(none: the student's, e.g. 0.95 for resnet50.a1_in1k; 1.0 if it declares none)")
    aa: str | None = option(None, metavar="SPEC", group="preprocessing",
                            help="timm RandAugment/AutoAugment spec for training images, e.g. rand-m9-mstd0.5 "
                                 "(needs augmentation)")
    reprob: float = option(0.0, metavar="P", group="preprocessing",
                           help="timm random-erasing probability for training images (needs augmentation)")
    scale: list[float] | None = option(None, metavar="LO HI", group="preprocessing",
                                       help="random-resized-crop area range of training images (none: timm's 0.08 1)")
    ratio: list[float] | None = option(None, metavar="LO HI", group="preprocessing",
                                       help="random-resized-crop aspect range of training images (none: timm's 0.75 "
                                            "1.333)")
    augment: bool | None = option(None, group="data",
                                  help="random crop/flip of training images (none: on for CIFAR and image folders, "
                                       "off for digits)")
    loss: list[str] = option(default_factory=list, metavar="NAME=WEIGHT[:KEY=VALUE,...]", repeat=True, group="loss",
                             help="a loss term, its weight and its options, repeatable, e.g. --loss kd=1 --loss "
                                  "jacobian=10:classes=label (none: kd=0.5:temperature=4 + jacobian=0.15, the "
                                  "documented preset); the names and their options: `jacplug plugins`; the form: "
                                  "docs/pipeline.md, Specs")
    epochs: int | None = option(None, group="student training",
                                help="student epochs (none: 4, or with --samples-per-class 150 steps when 4 epochs "
                                     "would make fewer)")
    steps: int | None = option(None, metavar="N", group="student training",
                               help="total student optimizer steps, instead of --epochs")
    batch_size: int = option(64, group="student training", help="batch size per process")
    lr: float = option(2e-3, group="student training", help="student learning rate, AdamW with cosine decay")
    weight_decay: float = option(0.05, group="student training", help="AdamW weight decay")
    seed: int = option(0, group="student training",
                       help="seed for initialisation, shuffling and the few-sample subset")
    device: str = option("auto", group="execution", help="auto (CUDA when available), cpu, cuda or cuda:N")
    out: str | None = option(None, metavar="DIR", group="execution",
                             help="run directory (none: runs/TEACHER-STUDENT-TIMESTAMP)")
    resume: bool | str = option(False, const=True, metavar="auto", item=resume_item, convert=resume_mode,
                                group="execution",
                                help="continue the interrupted run in --out DIR; '--resume auto': continue it if "
                                     "DIR holds one of this configuration, else start it (`torchrun --max-restarts`)")
    teacher_checkpoint: str | None = option(None, metavar="PATH", group="teacher",
                                            help="teacher weights (.safetensors) instead of training one")
    pretrained: bool = option(False, group="teacher",
                              help="start the teacher from timm's pretrained weights (needs internet), then "
                                   "fine-tune it")
    teacher_epochs: int | None = option(None, metavar="N", group="teacher",
                                        help="epochs to train the teacher when no checkpoint is given (none: 4)")
    teacher_steps: int | None = option(None, metavar="N", group="teacher",
                                       help="total teacher optimizer steps, instead of --teacher-epochs")
    teacher_lr: float = option(2e-3, group="teacher", help="teacher learning rate")
    cache_teacher: bool = option(False, group="teacher",
                                 help="compute the teacher's logits and Jacobian rows once (un-augmented data only)")
    check_gradients: bool = option(True, group="execution",
                                   help="check on the first batch that every loss term reaches the student")
    save_every: int = option(50, metavar="STEPS", group="execution",
                             help="also save resume state every STEPS steps (0: only at evaluations)")
    eval_batch_size: int = option(256, group="execution", help="batch size of evaluations")
    workers: int = option(0, group="execution",
                         help="data-loader worker processes of each training process (not `jacplug experiment "
                              "--workers`, which counts processes running cells)")
    max_steps_per_epoch: int | None = option(None, metavar="N", group="execution",
                                             help="cap the steps per epoch, teacher's and student's (smoke tests)")
    progress: bool | None = option(None, group="execution",
                                   help="progress bars (none: only when stderr is a terminal; without them a line "
                                        "when a phase starts, every 50 steps or 30 s, and per evaluation)")
    cuda_graphs: str = option("auto", choices=("auto", "on", "off"), group="execution",
                              help="capture the training step in a CUDA graph (auto: on for one CUDA device)")
    agreement_images: int = option(256, metavar="N", group="evaluation",
                                   help="held-out images on which every evaluation measures how far the student's "
                                        "input gradients agree with the teacher's, and gradient_maps.png is drawn "
                                        "(0: off)")
    log: list[str] = option(default_factory=list, metavar="NAME[:KEY=VALUE,...]", group="observers",
                            help="also report the run to these observers: tensorboard, mlflow (e.g. "
                                 "mlflow:tracking_uri=URI), or a plugin's (see `jacplug plugins`)")
    log_off: list[str] = option(default_factory=list, metavar="NAME", group="observers",
                               help="switch off built-in observers: metrics (metrics.jsonl), progress, plot")

    def validate(self) -> "TrainConfig":
        """Reject values no run could use, with the option name in the message."""
        for name in ("epochs", "steps", "teacher_steps", "batch_size", "eval_batch_size", "teacher_epochs",
                     "samples_per_class", "max_steps_per_epoch"):
            value = getattr(self, name)
            if value is not None and not 0 < int(value) <= MAX_COUNT:
                raise UserError(f"--{name.replace('_', '-')} must be a positive integer up to {MAX_COUNT}, got {value}")
        if self.batch_size < 2:
            raise UserError(f"--batch-size must be at least 2 (train-mode BatchNorm cannot normalise a single sample), "
                            f"got {self.batch_size}")
        if not 0 <= self.seed <= MAX_SEED:
            raise UserError(f"--seed must be an integer from 0 to {MAX_SEED} (64 bits), got {self.seed}")
        if self.out is not None and not str(self.out).strip():
            raise UserError("--out is empty; pass a directory, or leave --out out for runs/TEACHER-STUDENT-TIMESTAMP")
        if self.teacher_checkpoint:
            ignored = [f"--{_flag(name)}" for name in ("teacher_epochs", "teacher_steps")
                       if getattr(self, name) is not None]
            ignored += ["--teacher-lr"] if self.teacher_lr != FIELDS["teacher_lr"].default else []
            if ignored:
                raise UserError(f"{' and '.join(ignored)} set how the teacher is trained, but --teacher-checkpoint "
                                "gives a trained one; drop one of them")
        for epochs, steps in LENGTHS:
            if getattr(self, epochs) is not None and getattr(self, steps) is not None:
                raise UserError(f"--{_flag(epochs)} and --{_flag(steps)} both set the training length; pass one")
        if self.workers < 0:
            raise UserError(f"--workers must be >= 0, got {self.workers}")
        for name in ("lr", "teacher_lr"):
            value = float(getattr(self, name))
            if not (value > 0 and value < float("inf")):
                raise UserError(f"--{name.replace('_', '-')} must be a positive number, got {value}")
        if not 0 <= self.weight_decay < float("inf"):
            raise UserError(f"--weight-decay must be a finite number >= 0, got {self.weight_decay}")
        if self.image_size is not None and self.image_size <= 0:
            raise UserError(f"--image-size must be a positive integer, got {self.image_size}")
        if self.image_size is not None and self.image_size > MAX_IMAGE_SIZE:
            raise UserError(f"--image-size {self.image_size} is larger than {MAX_IMAGE_SIZE} px, beyond what a "
                            "training batch with a double backward fits in memory; use a smaller size")
        check_preprocessing(self)
        if self.agreement_images < 0:
            raise UserError(f"--agreement-images must be >= 0 (0 switches the measurement off), got {self.agreement_images}")
        if self.save_every < 0:
            raise UserError(f"--save-every must be >= 0, got {self.save_every}")
        check_device(self.device)
        if self.resume not in (True, False):  # "auto" is settled against --out before the config is resolved
            raise UserError(f"resume must be true or false once the run directory is known, got {self.resume!r}; "
                            "resolve --resume auto with jacplug.cli.cmd_train.resolve_config")
        if self.cuda_graphs not in ("auto", "on", "off"):
            raise UserError(f"--cuda-graphs must be auto, on or off, got {self.cuda_graphs!r}")
        if self.pretrained and self.teacher_checkpoint:
            raise UserError("--pretrained and --teacher-checkpoint both choose the teacher's weights; pass one")
        if self.pretrained:
            from ..models.pretrained import check_hub_reachable

            check_hub_reachable(self.teacher)
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
    """Options from a ``.yaml``/``.yml``/``.toml``/``.json`` file, keys normalised to field names and
    each value checked (:func:`jacplug.config_fields.read_options`)."""
    return read_options(TrainConfig, path)


def resolve(file_options: dict[str, Any], cli_options: dict[str, Any]) -> TrainConfig:
    """Defaults, then the file, then every CLI option the user actually gave (not ``None``). Without a
    ``teacher``, a ``teacher_checkpoint`` that records its model names the teacher."""
    given = {k for k, v in cli_options.items() if v is not None}
    replaced = {other for pair in LENGTHS for name, other in (pair, pair[::-1]) if name in given}
    file_side = {k: v for k, v in file_options.items() if k not in replaced}
    merged = merge_options(file_side, {k: v for k, v in cli_options.items() if k in FIELDS})
    hints = typing.get_type_hints(TrainConfig)
    if "teacher" not in merged and merged.get("teacher_checkpoint"):  # the checkpoint says which model it holds
        from ..io.checkpoint import checkpoint_model_name

        recorded = checkpoint_model_name(merged["teacher_checkpoint"])
        if recorded:
            merged["teacher"] = recorded
    for name, value in merged.items():
        check_value(name, value, hints[name], "options")
    return TrainConfig(**merged).validate()


#: options that define what a run computes; ``--resume`` refuses to change them
IDENTITY = ("teacher", "student", "dataset", "samples_per_class", "image_size", "augment", "loss", "batch_size",
            "lr", "weight_decay", "seed", "teacher_checkpoint", "pretrained", "teacher_epochs", "teacher_steps",
            "cache_teacher", "teacher_kwargs", "student_kwargs", "interpolation", "crop_pct", "aa", "reprob", "scale",
            "ratio")
#: options that set the length of the student's cosine schedule; ``--resume`` refuses to change them too
HORIZON = ("epochs", "steps", "max_steps_per_epoch")


def _saved_length(saved: dict[str, Any]) -> str:
    given = [f"--{_flag(k)} {saved[k]}" for k in HORIZON if saved.get(k) is not None]
    return " ".join(given) or "the default length"


#: what ``config.json`` records beside the options: the unreadable images the run dropped from its splits
RECORDS = ("dropped_images",)


def run_record(config: TrainConfig, splits: Any) -> str:
    """``config.json``: the options as the run executes them, and :data:`RECORDS` from its ``splits``."""
    return json.dumps({**config.to_dict(), "dropped_images": list(getattr(splits, "dropped_images", []))},
                      indent=2, sort_keys=True)


def saved_run(run_dir: str | Path) -> dict[str, Any] | None:
    """The options saved in ``run_dir/config.json`` (without :data:`RECORDS`), or ``None`` when the
    directory holds no run."""
    saved = Path(run_dir) / "config.json"
    if not saved.is_file():
        return None
    try:
        options = json.loads(saved.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{str(saved)!r} is corrupt ({exc}); the run cannot be resumed") from exc
    return {k: v for k, v in options.items() if k not in RECORDS} if isinstance(options, dict) else options


def for_resume(saved: dict[str, Any], overrides: dict[str, Any], run_dir: str, flag: str = "--resume") -> TrainConfig:
    """The saved config of ``run_dir`` with ``overrides`` (options given again on the command line).

    Options in :data:`IDENTITY` must keep their saved values (a different loss or seed would not
    continue the same run), and so must the length (:data:`HORIZON`): the learning rate follows a
    cosine that reaches zero at the saved last step, so another length would make it jump mid-run.
    Others (``device``, ``save_every``, ``workers``, progress) may change. ``flag`` names the option
    in the refusals (``--resume auto`` refuses a directory holding a run of another configuration).
    """
    overrides = model_options({k: v for k, v in overrides.items() if v is not None})
    length = [k for k in HORIZON if overrides.get(k) is not None and overrides[k] != saved.get(k)]
    if length:
        given = " ".join(f"--{_flag(k)} {overrides[k]}" for k in length)
        raise UserError(
            f"{flag} cannot change the training length of the run in {run_dir!r} ({given}; saved: "
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
            f"{flag} continues the run in {run_dir!r} with its saved options, but these differ: {'; '.join(changed)}; "
            "drop them, or start a new run with another --out"
        )
    unknown = [k for k in saved if k not in FIELDS]
    if unknown:
        raise UserError(f"{run_dir!r}/config.json has unknown options {unknown}; was it written by another jacplug version?")
    kept = [spec for spec in saved.get("log") or [] if ":" in spec]
    if kept and overrides.get("log") is None:
        # an observer's options say where the run's data goes (mlflow:tracking_uri=URI): a config.json handed
        # over with the run directory must not choose that; the user's command line or environment does
        raise UserError(f"{flag}: the run in {run_dir!r} was reported with --log {' '.join(kept)} (saved in its "
                        "config.json, which does not choose where data is sent); give --log again with what you want "
                        "now (the same, or e.g. --log mlflow for $MLFLOW_TRACKING_URI)")
    options = {**saved, **{k: v for k, v in overrides.items() if v is not None and k in FIELDS}}
    options["resume"], options["out"] = True, run_dir
    return resolve({}, options)
