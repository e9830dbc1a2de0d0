"""jacplug: Jacobian-matching knowledge distillation for PyTorch.

The front door is :class:`jacplug.Distiller`, the whole distillation step for any training loop. The
parts beneath it (Jacobian engine, feature taps, losses, gradient-flow check) are usable in any
training loop without the registry or CLI. Attributes are imported lazily so ``import jacplug`` and
plugin discovery stay cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from ._version import __version__
from .errors import DetachedLossError, UnknownNameError, UserError
from .hookspecs import hookimpl

# public name -> module that defines it
_LAZY = {
    "jacobian": "jacplug.engine",
    "vjp": "jacplug.engine",
    "jvp": "jacplug.engine",
    "JacobianBackend": "jacplug.engine",
    "JacobianArgumentError": "jacplug.engine",
    "FeatureTap": "jacplug.features",
    "CapturedStep": "jacplug.capture",
    "Distiller": "jacplug.distiller",
    "double_differentiable": "jacplug.engine.substitutions",
    "forward_mode_safe": "jacplug.engine.substitutions",
    "gradient_flow": "jacplug.checks.gradient_flow",
    "create_model": "jacplug.registry",
    "create_loss": "jacplug.registry",
    "create_dataset": "jacplug.registry",
    "load_model": "jacplug.models.pretrained",
}

__all__ = ["__version__", "hookimpl", "UserError", "UnknownNameError", "DetachedLossError", *_LAZY]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'jacplug' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
