"""Build a ready model from a checkpoint written by ``jacplug train``, with timm's ``pretrained_cfg``.

Why: a timm user hands the model to timm's own tooling (``timm.data.resolve_data_config``,
``create_transform``, validation scripts), which reads the preprocessing from
``model.pretrained_cfg``. A model built with plain ``timm.create_model(name)`` carries ImageNet's
defaults there (3x224x224, ImageNet mean/std), not what the checkpoint was trained on.
"""

from __future__ import annotations

import json
import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from torch import nn

from ..data.preprocess import renormalize
from ..errors import UserError
from ..io.checkpoint import load_weights
from ..io.checkpoint import checkpoint_model_kwargs, checkpoint_model_name, checkpoint_statistics, pretrained_cfg, read_checkpoint


#: the ``pretrained_cfg`` keys a checkpoint records: how its inputs were prepared, nothing that names a place
DATA_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode", "num_classes")


def checkpoint_pretrained_cfg(metadata: dict[str, str]) -> dict[str, Any]:
    """timm ``pretrained_cfg`` data keys from a checkpoint's metadata (lists as tuples, as timm's
    own configs hold them); rebuilt from ``input_size``/``mean``/``std`` for files written before
    checkpoints stored it. Only the data keys pass: a file's ``url``, ``file`` or ``hf_hub_id`` there would
    send timm's ``load_pretrained(model)`` to an address of the file's choosing."""
    if "pretrained_cfg" in metadata:
        recorded = json.loads(metadata["pretrained_cfg"])
        cfg = {k: recorded[k] for k in DATA_KEYS if isinstance(recorded, dict) and k in recorded}
    else:
        cfg = pretrained_cfg(
            int(metadata["num_classes"]),
            tuple(json.loads(metadata["input_size"])),
            tuple(json.loads(metadata["mean"])),
            tuple(json.loads(metadata["std"])),
        )
    return {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}


def load_model(path: str | Path) -> nn.Module:
    """The model saved in ``path`` (a jacplug model checkpoint), built through jacplug's model
    registry, with its weights loaded and ``model.pretrained_cfg`` set to what it was trained on.

    The model is returned in train mode, as ``timm.create_model`` returns it; call ``.eval()`` for
    inference. A file that is not a jacplug model checkpoint is a one-line :class:`UserError`.
    """
    from ..registry import create_model

    _, metadata = read_checkpoint(path)
    missing = [k for k in ("model", "num_classes", "in_chans", "input_size", "mean", "std") if k not in metadata]
    if missing:
        raise UserError(
            f"checkpoint {str(path)!r} has no {', '.join(missing)} in its metadata, so the model cannot be "
            f"rebuilt from it; it was not written by `jacplug train` (build the model yourself and load the "
            f"weights with safetensors)"
        )
    name, num_classes, in_chans = checkpoint_model_name(path), int(metadata["num_classes"]), int(metadata["in_chans"])
    kwargs = checkpoint_model_kwargs(path) or {}  # e.g. a ViT's img_size: the model it was trained as
    model = create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    load_weights(path, model, expected_name=name, num_classes=num_classes, in_chans=in_chans, model_kwargs=kwargs)
    # what timm.create_model(..., pretrained_cfg_overlay=cfg) does, for models from any registry plugin
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **checkpoint_pretrained_cfg(metadata)}
    if hasattr(model, "default_cfg"):
        model.default_cfg = model.pretrained_cfg
    return model


def teacher_view(teacher_checkpoint: str | None, mean: tuple[float, ...], std: tuple[float, ...]) -> nn.Module | None:
    """The map from the run's normalisation (``mean``/``std``) to the one ``teacher_checkpoint`` records
    it was trained on (:class:`~..data.preprocess.Renormalize`), or None when they agree or there is no
    checkpoint (a teacher trained in the run sees the run's tensors). Given to the Distiller as its
    ``teacher_input``, the teacher's Jacobian is taken w.r.t. the student's input, chain rule included."""

    recorded = checkpoint_statistics(teacher_checkpoint) if teacher_checkpoint else None
    if recorded is None or len(recorded[0]) != len(mean):
        return None
    return renormalize(mean, std, *recorded)


def check_hub_reachable(model: str, timeout_s: float = 5.0) -> None:
    """A one-line :class:`UserError` when ``--pretrained`` weights for ``model`` (a timm name, optionally
    ``NAME:KEY=VAL,...``) can neither come from the local Hugging Face cache nor be downloaded.

    Why: offline, ``huggingface_hub`` retries for about 50 s and timm prints a long chain of errors, after the
    run directory was written. Here cached weights pass without touching the network; ``HF_HUB_OFFLINE``
    without them is refused at once; otherwise one request to the hub's endpoint (through the user's
    proxies) must answer within ``timeout_s``. Models whose weights are not on the hub are left to timm."""

    repo, filenames = _hub_weights(model.split(":", 1)[0])
    if repo is None:
        return
    from huggingface_hub import constants, try_to_load_from_cache

    if any(isinstance(try_to_load_from_cache(repo, name), str) for name in filenames):
        return
    fix = "connect to the internet, or drop --pretrained to train the teacher from scratch"
    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE"):
        raise UserError(f"--pretrained: the weights of {model!r} ({repo}) are not in the local Hugging Face cache "
                        f"and HF_HUB_OFFLINE is set; {fix}")
    try:
        urllib.request.urlopen(urllib.request.Request(constants.ENDPOINT, method="HEAD"), timeout=timeout_s).close()
    except urllib.error.HTTPError:
        return  # the hub answered
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise UserError(f"--pretrained: cannot reach {constants.ENDPOINT} to download the weights of {model!r} "
                        f"({reason}); {fix}") from None


def _hub_weights(name: str) -> tuple[str | None, tuple[str, ...]]:
    """The Hugging Face repository of a timm model's default pretrained weights and the files timm may fetch
    from it, or ``(None, ())`` for a name timm does not know or weights that are not on the hub."""
    try:
        from timm.models import get_pretrained_cfg

        cfg = get_pretrained_cfg(name)
    except Exception:  # a plugin's model, or a timm without this helper: timm reports its own error later
        return None, ()
    if cfg is None or not cfg.hf_hub_id:
        return None, ()
    return cfg.hf_hub_id, tuple(filter(None, (cfg.hf_hub_filename, "model.safetensors", "pytorch_model.bin",
                                              "open_clip_pytorch_model.bin")))
