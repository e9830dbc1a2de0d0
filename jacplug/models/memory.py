"""How much memory a training step needs at least, before anything is allocated.

Why: an image folder is decoded lazily, so a huge ``--image-size`` allocated nothing until the first
forward, which then ended in an out-of-memory traceback (or the machine swapping) after the run
directory was written. The activations a model keeps for its backward pass grow with the pixels:
they are counted here by running the model once on PyTorch's ``meta`` device (shapes only: no memory,
no arithmetic), summing the outputs of its leaf modules (in-place activations and identities share
their input's storage and are skipped). Times the batch and 4 bytes per float32, that is a lower bound
of one training step: the gradients, the optimizer state and the Jacobian terms' double backward come
on top, so a run refused by it could not have run.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn

from ..registry import create_model
from .build import takes_img_size

#: modules whose output is their input's storage, or nothing a backward keeps
_NO_STORAGE = (nn.Identity, nn.Dropout, nn.Flatten)


def activation_elements(name: str, kwargs: dict[str, Any], in_chans: int, num_classes: int, size: int) -> int | None:
    """Floats the leaf modules of ``name`` output for one ``size`` x ``size`` image, or None when the
    model does not run on the meta device (a build or forward error is reported by the model build)."""
    counted = [0]

    def count(module: nn.Module, inputs: Any, output: Any) -> None:
        if torch.is_tensor(output) and not getattr(module, "inplace", False) and not isinstance(module, _NO_STORAGE):
            counted[0] += output.numel()

    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"):
            model = create_model(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
            if "img_size" not in kwargs and takes_img_size(model):
                model = create_model(name, num_classes=num_classes, in_chans=in_chans, img_size=size, **kwargs)
        handles = [m.register_forward_hook(count) for m in model.modules() if not any(True for _ in m.children())]
        with torch.no_grad():
            model.eval()(torch.empty(1, in_chans, size, size, device="meta"))
        for handle in handles:
            handle.remove()
    except Exception:  # not every model runs on meta tensors (data-dependent shapes); no estimate then
        return None
    return counted[0]


def available_bytes(device: torch.device) -> int | None:
    """Free memory on ``device``: the CUDA device's free memory, or the host's available memory (Linux's
    ``MemAvailable``); None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None
