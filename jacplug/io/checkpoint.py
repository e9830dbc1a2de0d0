"""Checkpoints: safetensors only, written atomically, validated on load.

Model files (``teacher.safetensors``, ``student_best.safetensors``, ``student_last.safetensors``)
hold the plain timm ``state_dict`` (no ``module.`` prefix, contiguous tensors) and string metadata:
``format`` (``jacplug-model/1``), ``role``, ``model``, ``num_classes``, ``in_chans``,
``input_size`` (JSON ``[C, H, W]``), ``mean``/``std`` (JSON lists), ``config`` (JSON), ``metrics``
(JSON, e.g. accuracies), ``model_kwargs`` (JSON: the other constructor kwargs, ``img_size``
included), ``jacplug_version``, and ``pretrained_cfg`` (JSON): timm's data keys
(``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct``, ``crop_mode``, ``num_classes``),
so that ``timm.data.resolve_data_config(model=...)`` on a model built from the file gives this run's
preprocessing instead of ImageNet's. Loading needs only ``safetensors`` and ``timm.create_model(model,
num_classes=..., in_chans=..., pretrained_cfg_overlay=..., **model_kwargs)``; :func:`jacplug.load_weights` does it.

A resume file (``resume.safetensors`` for the student phase, ``teacher_resume.safetensors`` for the
teacher's) is one file, so it is always self-consistent: the phase's models (the student and the loss
module with its adapters, or the teacher), the optimizer's tensors, the RNG states and the data
loader's shuffling generator as tensors, and as JSON
metadata the optimizer's param groups and scalars, the scheduler, and the position (epoch, batches
consumed, global step, best accuracy). Nothing is ever unpickled.

Every file is written through :mod:`.files`: whole or not at all, never through a link, and a failed
write is a one-line error naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save
from torch import Tensor, nn

from .._version import __version__
from ..errors import UserError
from .files import atomic_write_bytes
from .recorded import recorded_model_kwargs, recorded_model_name

MODEL_FORMAT = "jacplug-model/1"
#: what a checkpoint records when its writer gives no preprocessing: bilinear (the digits' upsampling)
#: and no crop (CIFAR and image folders pass the student's timm data configuration instead)
INTERPOLATION, CROP_PCT = "bilinear", 1.0
RESUME_FORMAT = "jacplug-resume/1"


def _plain_state(module: nn.Module) -> dict[str, Tensor]:
    """``state_dict`` without a DDP wrapper prefix, as contiguous CPU tensors (safetensors needs both)."""
    module = getattr(module, "module", module)
    return {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}


def save_model(
    path: str | Path,
    model: nn.Module,
    *,
    role: str,
    name: str,
    num_classes: int,
    input_shape: tuple[int, int, int],
    mean: tuple[float, ...],
    std: tuple[float, ...],
    config: dict[str, Any],
    metrics: dict[str, float] | None = None,
    model_kwargs: dict[str, Any] | None = None,
    interpolation: str = INTERPOLATION,
    crop_pct: float = CROP_PCT,
    crop_mode: str = "center",
) -> None:
    """Write a model checkpoint that loads with plain safetensors + timm (see the module docstring);
    ``interpolation``/``crop_pct``/``crop_mode``: how the images were resized and cropped."""
    metadata = {
        "format": MODEL_FORMAT,
        "role": role,
        "model": name,
        "num_classes": str(num_classes),
        "in_chans": str(input_shape[0]),
        "input_size": json.dumps(list(input_shape)),
        "mean": json.dumps(list(mean)),
        "std": json.dumps(list(std)),
        "config": json.dumps(config, sort_keys=True),
        "metrics": json.dumps(metrics or {}, sort_keys=True),
        "model_kwargs": json.dumps(model_kwargs or {}, sort_keys=True),
        "jacplug_version": __version__,
        "pretrained_cfg": json.dumps(pretrained_cfg(num_classes, input_shape, mean, std, interpolation, crop_pct,
                                                     crop_mode)),
    }
    state = _plain_state(model)
    atomic_write_bytes(path, save(state, metadata=metadata))


def pretrained_cfg(
    num_classes: int, input_shape: tuple[int, int, int], mean: tuple[float, ...], std: tuple[float, ...],
    interpolation: str = INTERPOLATION, crop_pct: float = CROP_PCT, crop_mode: str = "center",
) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` data keys for a model trained on ``input_shape`` ``(C, H, W)`` images
    resized with ``interpolation``, centre-cropped at ``crop_pct`` and normalised with ``mean``/``std``:
    what ``timm.data.resolve_data_config`` reads."""
    return {
        "input_size": list(input_shape),
        "mean": list(mean),
        "std": list(std),
        "interpolation": interpolation,
        "crop_pct": crop_pct,
        "crop_mode": crop_mode,
        "num_classes": num_classes,
    }


def read_checkpoint(path: str | Path, remedy: str | None = None) -> tuple[dict[str, Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors file; a missing or unreadable file is a one-line UserError
    that names the file and ends with ``remedy`` (default: :func:`_damaged_remedy`)."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {str(path)!r} is a directory; pass the .safetensors file in it")
    if not path.is_file():
        raise UserError(f"checkpoint {str(path)!r} does not exist")
    try:

        with safe_open(str(path), framework="pt") as fh:
            metadata = dict(fh.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise UserError(
            f"checkpoint {str(path)!r} is corrupt or not a safetensors file ({' '.join(str(exc).split())}); "
            f"{remedy or _damaged_remedy(path)}"
        ) from exc
    return tensors, metadata


def _damaged_remedy(path: Path) -> str:
    """What to do about a damaged checkpoint: a run directory's own file (beside its ``config.json``) is
    computed again by ``--resume`` once deleted; a file given by the user must be re-created or replaced."""
    if (path.parent / "config.json").is_file():
        return (f"it belongs to the run in {str(path.parent)!r}: delete it and run again with --resume --out "
                f"{str(path.parent)!r} to compute it again")
    return "re-create it, or train the teacher again without --teacher-checkpoint"


def checkpoint_model_kwargs(path: str | Path) -> dict[str, Any] | None:
    """The constructor kwargs a model checkpoint records, or None (none recorded, or no readable file:
    :func:`load_weights` then says what is wrong). Only architecture arguments pass
    (:func:`.recorded.recorded_model_kwargs`): anything else is a one-line UserError naming the key."""
    recorded = _recorded(path, "model_kwargs")
    try:
        kwargs = json.loads(recorded) if recorded else None
    except ValueError:
        return None
    return None if kwargs is None else recorded_model_kwargs(kwargs, f"checkpoint {str(path)!r}")


def checkpoint_model_name(path: str | Path) -> str | None:
    """The registered model name a model checkpoint records, or None (see :func:`checkpoint_model_kwargs`);
    a recorded name that is not a model name (a path, a hub address) is a one-line UserError."""
    name = _recorded(path, "model")
    return None if name is None else recorded_model_name(name, f"checkpoint {str(path)!r}")


def checkpoint_statistics(path: str | Path) -> tuple[list[float], list[float]] | None:
    """The ``(mean, std)`` a model checkpoint records its inputs were normalised with, or None (see
    :func:`checkpoint_model_kwargs`)."""
    try:
        mean, std = (json.loads(_recorded(path, key) or "null") for key in ("mean", "std"))
    except ValueError:
        return None
    return (mean, std) if isinstance(mean, list) and isinstance(std, list) else None


def _recorded(path: str | Path, key: str) -> str | None:
    try:

        with safe_open(str(path), framework="pt") as fh:
            return (fh.metadata() or {}).get(key)
    except (SafetensorError, OSError, ValueError, RuntimeError):
        return None


def load_weights(
    path: str | Path,
    model: nn.Module,
    *,
    expected_name: str | None = None,
    num_classes: int | None = None,
    in_chans: int | None = None,
    model_kwargs: dict[str, Any] | None = None,
) -> dict[str, str]:
    """Load a model checkpoint into ``model`` after checking it fits; returns the metadata.

    A checkpoint without jacplug metadata (a plain ``save_file(model.state_dict())``) is accepted
    when its tensors fit ``model``. Mismatches (other architecture, class count, channels or
    constructor kwargs, e.g. a ViT's ``img_size``) raise a one-line :class:`UserError` that names both sides.
    """
    tensors, meta = read_checkpoint(path)
    where = f"checkpoint {str(path)!r}"
    if expected_name and meta.get("model") and meta["model"] != expected_name:
        raise UserError(f"{where} holds a {meta['model']!r} model, but {expected_name!r} was requested")
    if num_classes is not None and meta.get("num_classes") and int(meta["num_classes"]) != num_classes:
        raise UserError(
            f"{where} was trained for {meta['num_classes']} classes, but the dataset has {num_classes}; "
            "use a checkpoint trained on this dataset, or omit --teacher-checkpoint to train one"
        )
    if in_chans is not None and meta.get("in_chans") and int(meta["in_chans"]) != in_chans:
        raise UserError(f"{where} expects {meta['in_chans']} input channels, but the dataset has {in_chans}")
    if model_kwargs is not None and "model_kwargs" in meta:
        saved, requested = json.loads(meta["model_kwargs"]), json.loads(json.dumps(model_kwargs))
        if saved != requested:
            raise UserError(
                f"{where} holds a model built with kwargs {saved}, but this run builds it with {requested}; "
                "use the kwargs and --image-size it was trained with"
            )
    target = getattr(model, "module", model)
    expected = target.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = sorted(k for k in set(expected) & set(tensors) if tuple(expected[k].shape) != tuple(tensors[k].shape))
    if missing or unexpected or wrong:
        detail = "; ".join(
            f"{label}: {', '.join(keys[:3])}{' ...' if len(keys) > 3 else ''}"
            for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong))
            if keys
        )
        unnamed = ""
        if not meta.get("model"):  # a plain save_file(state_dict): only the user knows which model it holds
            unnamed = (f"; it records no model name, so it was tried as {expected_name or 'the model requested'}: pass "
                       "--teacher with the model it holds")
        raise UserError(f"{where} does not fit the {type(target).__name__} being loaded ({detail}){unnamed}")
    target.load_state_dict(tensors)
    return meta


# ---------------------------------------------------------------------------------------------------
# resume state


def _optimizer_to_flat(state: dict[str, Any]) -> tuple[dict[str, Tensor], dict[str, Any]]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_from_flat(tensors: dict[str, Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        if key.startswith("optim."):
            _, pid, name = key.split(".", 2)
            state.setdefault(int(pid), {})[name] = value
    for pid, entries in meta["scalars"].items():
        state.setdefault(int(pid), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def rng_tensors() -> dict[str, Tensor]:
    states = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"rng.cuda.{i}"] = s
    return states


def restore_rng(tensors: dict[str, Tensor]) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_resume(
    path: str | Path,
    *,
    models: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    position: dict[str, Any],
    config: dict[str, Any],
    generators: dict[str, torch.Generator] | None = None,
) -> None:
    """Everything ``--resume`` needs to continue a phase, in one atomically written safetensors file:
    ``models`` (e.g. ``{"student": ..., "loss": ...}``, each under its name), the optimizer, the
    scheduler, the global RNG states and ``generators`` (e.g. a data loader's shuffling generator)."""
    tensors = {f"{name}.{k}": v for name, module in models.items() for k, v in _plain_state(module).items()}
    optim_tensors, optim_meta = _optimizer_to_flat(optimizer.state_dict())
    tensors.update(optim_tensors)
    tensors.update(rng_tensors())
    tensors.update({f"generator.{name}": g.get_state() for name, g in (generators or {}).items()})
    metadata = {
        "format": RESUME_FORMAT,
        "optimizer": json.dumps(optim_meta),
        "scheduler": json.dumps(scheduler.state_dict()),
        "position": json.dumps(position),
        "config": json.dumps(config, sort_keys=True),
        "jacplug_version": __version__,
    }
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def load_resume(
    path: str | Path,
    *,
    models: dict[str, nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generators: dict[str, torch.Generator] | None = None,
    remedy: str = ("this run's resume state is damaged: delete it to restart the student phase with --resume (the "
                   "trained teacher is kept), or start a new run with another --out"),
) -> dict[str, Any]:
    """Restore what :func:`save_resume` wrote (RNG and ``generators`` included); returns the saved position.
    ``remedy`` ends the one-line error about a damaged file."""
    tensors, meta = read_checkpoint(path, remedy=remedy)
    if meta.get("format") != RESUME_FORMAT:
        raise UserError(f"{str(path)!r} is not a jacplug resume file (format {meta.get('format')!r})")

    def part(prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}

    try:
        for name, module in models.items():
            getattr(module, "module", module).load_state_dict(part(f"{name}."))
        optimizer.load_state_dict(_optimizer_from_flat(tensors, json.loads(meta["optimizer"])))
        scheduler.load_state_dict(json.loads(meta["scheduler"]))
    except (RuntimeError, KeyError, ValueError) as exc:
        raise UserError(
            f"resume file {str(path)!r} does not match this run's {', '.join(models)} or optimizer "
            f"({' '.join(str(exc).split())[:200]}); start a new run with a fresh --out"
        ) from exc
    restore_rng(tensors)
    for name, generator in (generators or {}).items():
        generator.set_state(tensors[f"generator.{name}"])
    return json.loads(meta["position"])
