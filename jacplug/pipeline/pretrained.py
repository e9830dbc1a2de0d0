"""Build a ready model from a checkpoint written by ``jacplug train``, with timm's ``pretrained_cfg``.

Why: a timm user hands the model to timm's own tooling (``timm.data.resolve_data_config``,
``create_transform``, validation scripts), which reads the preprocessing from
``model.pretrained_cfg``. A model built with plain ``timm.create_model(name)`` carries ImageNet's
defaults there (3x224x224, ImageNet mean/std), not what the checkpoint was trained on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import UserError
from .checkpoint import load_model as load_weights
from .checkpoint import checkpoint_model_kwargs, pretrained_cfg, read_checkpoint


def checkpoint_pretrained_cfg(metadata: dict[str, str]) -> dict[str, Any]:
    """timm ``pretrained_cfg`` data keys from a checkpoint's metadata (lists as tuples, as timm's
    own configs hold them); rebuilt from ``input_size``/``mean``/``std`` for files written before
    checkpoints stored it."""
    if "pretrained_cfg" in metadata:
        cfg = json.loads(metadata["pretrained_cfg"])
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
    name, num_classes, in_chans = metadata["model"], int(metadata["num_classes"]), int(metadata["in_chans"])
    kwargs = checkpoint_model_kwargs(path) or {}  # e.g. a ViT's img_size: the model it was trained as
    model = create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    load_weights(path, model, expected_name=name, num_classes=num_classes, in_chans=in_chans, model_kwargs=kwargs)
    # what timm.create_model(..., pretrained_cfg_overlay=cfg) does, for models from any registry plugin
    model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), **checkpoint_pretrained_cfg(metadata)}
    if hasattr(model, "default_cfg"):
        model.default_cfg = model.pretrained_cfg
    return model
