"""The Jacobian engine (``jacplug.engine``; the main function is also ``jacplug.jacobian``): per-sample input Jacobians and Jacobian-vector products that stay on the graph.

``jacobian(f, inputs, rows=None, *, backend="auto", create_graph=True) -> [B, R, *S]``
``vjp(outputs, inputs, v) -> v^T J``, ``jvp(f, inputs, u, method=...) -> J u``.
"""

from .api import jacobian, jvp, resolve_backend, vjp
from .backends import (
    BUILTIN_BACKENDS,
    AutoBackend,
    BatchedBackend,
    FiniteDifferenceBackend,
    ForwardBackend,
    JacobianBackend,
    LoopBackend,
)
from .products import default_step
from .arguments import JacobianArgumentError

__all__ = [
    "jacobian",
    "vjp",
    "jvp",
    "resolve_backend",
    "default_step",
    "JacobianBackend",
    "JacobianArgumentError",
    "AutoBackend",
    "LoopBackend",
    "BatchedBackend",
    "ForwardBackend",
    "FiniteDifferenceBackend",
    "BUILTIN_BACKENDS",
]
