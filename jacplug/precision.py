"""The autocast of a distillation step's forward passes: the dtype an ``amp=`` setting means on a device,
and the context that applies it.

Only the forward passes run under autocast; the loss terms run outside it on logits of at least float32
(:mod:`jacplug.outputs`). Inside a CUDA-graph capture autocast's cache of cast weights is off: the cache
must not outlive the capture (PyTorch's rule for capturing autocast regions).
"""

from __future__ import annotations

import contextlib

import torch

Amp = bool | str | torch.dtype | None


def autocast_dtype(amp: Amp, device: torch.device) -> torch.dtype | None:
    """``"auto"``: bf16 on a CUDA device with bf16, none elsewhere; ``True``: bf16; ``False``/``None``: none;
    a dtype: itself. ``None`` means full precision."""
    if amp in (None, False):
        return None
    if amp == "auto":
        return torch.bfloat16 if device.type == "cuda" and torch.cuda.is_bf16_supported() else None
    return torch.bfloat16 if amp is True else amp


def forward_autocast(dtype: torch.dtype | None, device: torch.device) -> contextlib.AbstractContextManager:
    """Autocast to ``dtype`` on ``device`` (a no-op for ``None``), its weight cache off during a capture."""
    if dtype is None:
        return contextlib.nullcontext()
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    return torch.autocast(device.type, dtype=dtype, cache_enabled=not capturing)
