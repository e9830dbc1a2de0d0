"""Public entry points: ``jacobian``, ``vjp``, ``jvp``.

All three keep their result on the autograd graph by default (``create_graph=True``), so a loss
built from them trains the parameters that produced the outputs; pass ``create_graph=False`` for a
frozen teacher, whose Jacobian is a constant target: no graph is built and the outputs' graph is
freed as soon as the last product is taken.
"""

from __future__ import annotations

from typing import Callable, Union

from torch import Tensor

from .backends import JacobianBackend
from .products import finite_difference_products, forward_products, reverse_products
from .arguments import (
    JacobianArgumentError,
    check_input_directions,
    check_inputs,
    check_output_vectors,
    check_outputs,
    check_rows,
)

Function = Callable[[Tensor], Tensor]
BackendSpec = Union[str, JacobianBackend]


def resolve_backend(backend: BackendSpec) -> JacobianBackend:
    """A backend instance, or a registered name (built-ins and plugins, loaded lazily)."""
    if isinstance(backend, JacobianBackend):
        return backend
    if not isinstance(backend, str):
        raise JacobianArgumentError(f"backend must be a name or a JacobianBackend, got {type(backend).__name__}")
    from ..registry import get_jacobian_backend  # names live in the plugin registry

    return get_jacobian_backend(backend)


def jacobian(
    f: Tensor | Function,
    inputs: Tensor,
    rows: Tensor | None = None,
    *,
    backend: BackendSpec = "auto",
    create_graph: bool = True,
) -> Tensor:
    """Per-sample input Jacobian rows ``[B, R, *S]``.

    ``f``: outputs ``[B, C]`` already computed from ``inputs`` ``[B, *S]`` (which must require grad
    before that forward pass), or a callable ``x -> [B, C]`` (needed by the ``forward`` and
    ``finite-difference`` backends, accepted by all). ``rows``: ``None`` for all ``C`` rows, or a
    LongTensor ``[B]`` / ``[B, R]`` of class indices per sample (e.g. the teacher's top-1 class).
    """
    check_inputs(inputs)
    impl = resolve_backend(backend)
    if isinstance(f, Tensor):
        if impl.requires_callable:
            return impl.from_outputs(f, inputs, f, create_graph=create_graph)  # refuses with the reason
        check_outputs(f, inputs)
        selected = check_rows(rows, f.shape[0], f.shape[1], f.device)
        return impl.from_outputs(f, inputs, selected, create_graph=create_graph)
    if not callable(f):
        raise JacobianArgumentError(f"f must be outputs [B, C] or a callable, got {type(f).__name__}")
    return impl.from_callable(f, inputs, rows, create_graph=create_graph)


def vjp(
    outputs: Tensor,
    inputs: Tensor,
    v: Tensor,
    *,
    create_graph: bool = True,
    retain_graph: bool | None = None,
    batched: bool | None = None,
) -> Tensor:
    """``v^T J`` per sample: ``v`` ``[B, C]`` -> ``[B, *S]``; ``[B, k, C]`` -> ``[B, k, *S]``.

    One reverse pass per projection. ``batched=None`` vmaps the ``k`` passes on CUDA only (the same
    measured rule as the ``auto`` backend). ``retain_graph`` defaults to ``create_graph``.
    """
    check_inputs(inputs)
    check_outputs(outputs, inputs)
    single = v.dim() == 2
    vectors = check_output_vectors(v, outputs)
    use_batched = outputs.device.type == "cuda" if batched is None else batched
    result = reverse_products(
        outputs, inputs, vectors, create_graph=create_graph, retain_graph=retain_graph, batched=use_batched
    )
    return result[:, 0] if single else result


def jvp(
    f: Function,
    inputs: Tensor,
    u: Tensor,
    *,
    method: str = "forward",
    create_graph: bool = True,
    step: float | None = None,
    scheme: str = "central",
    outputs: Tensor | None = None,
) -> Tensor:
    """``J u`` per sample: ``u`` ``[B, *S]`` -> ``[B, C]``; ``[B, k, *S]`` -> ``[B, k, C]``.

    ``method="forward"``: exact, forward-mode AD, one extra forward pass per direction.
    ``method="finite-difference"``: ``scheme="central"`` (two evaluations, second-order accurate) or
    ``"forward"`` (one evaluation, reusing ``outputs = f(inputs)`` when given); the step is
    documented in :func:`jacplug.engine.products.default_step`. Both need ``f`` itself.
    """
    if isinstance(f, Tensor) or not callable(f):
        raise JacobianArgumentError(
            "jvp re-evaluates the function, so pass the model (a callable x -> [B, C]), not its outputs"
        )
    check_inputs(inputs)
    single = u.shape == inputs.shape
    directions = check_input_directions(u, inputs)
    if method == "forward":
        result = forward_products(f, inputs, directions, create_graph=create_graph)
    elif method == "finite-difference":
        result = finite_difference_products(
            f, inputs, directions, create_graph=create_graph, step=step, scheme=scheme, outputs=outputs
        )
    else:
        raise JacobianArgumentError(f"jvp method must be 'forward' or 'finite-difference', got {method!r}")
    return result[:, 0] if single else result

