"""Jacobian backends: different ways to compute the same per-sample Jacobian rows.

Every backend returns ``[B, R, *S]`` for LongTensor ``rows`` ``[B, R]``. Reverse-mode backends work
from already computed outputs (one VJP per row: cost grows with R, not with the input size);
forward-mode and finite-difference backends re-evaluate the function once (forward) or twice
(central differences) per input dimension, so they only suit small inputs and are here mainly for
``jvp``-style direction products and as independent cross-checks.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

from .products import basis_directions, finite_difference_products, forward_products, reverse_products
from .arguments import JacobianArgumentError, check_rows, evaluate

#: input dimensions assembled per chunk by the forward / finite-difference full-Jacobian path
_COLUMN_CHUNK = 64


def _one_hot_rows(outputs: Tensor, rows: Tensor) -> Tensor:
    """``rows`` ``[B, R]`` -> output vectors ``[B, R, C]`` selecting those rows."""
    vectors = torch.zeros(*rows.shape, outputs.shape[1], dtype=outputs.dtype, device=outputs.device)
    return vectors.scatter_(2, rows.unsqueeze(2), 1.0)


class JacobianBackend:
    """Base class. Subclasses implement :meth:`from_outputs` (reverse mode) or :meth:`from_callable`.

    ``requires_callable``: the backend must re-evaluate the function, so it refuses outputs tensors.
    ``description``: one line for ``jacplug plugins`` and error messages.
    """

    name = "base"
    requires_callable = False
    description = ""

    def from_outputs(self, outputs: Tensor, inputs: Tensor, rows: Tensor, *, create_graph: bool) -> Tensor:
        raise JacobianArgumentError(
            f"Jacobian backend {self.name!r} re-evaluates the function, so it needs the model as a callable "
            f"(jacplug.jacobian(model, inputs, ...)) rather than already computed outputs"
        )

    def from_callable(
        self, f: Callable[[Tensor], Tensor], inputs: Tensor, rows: Tensor | None, *, create_graph: bool
    ) -> Tensor:
        outputs, x = evaluate(f, inputs, create_graph=create_graph)
        rows = check_rows(rows, outputs.shape[0], outputs.shape[1], outputs.device)
        return self.from_outputs(outputs, x, rows, create_graph=create_graph)

    def __repr__(self) -> str:
        return f"<JacobianBackend {self.name!r}>"


class LoopBackend(JacobianBackend):
    """One ``autograd.grad`` per selected row: the reference, and the fastest on CPU (measured)."""

    name = "loop"
    description = "reverse mode, one VJP per selected row (reference; fastest on CPU)"

    def from_outputs(self, outputs: Tensor, inputs: Tensor, rows: Tensor, *, create_graph: bool) -> Tensor:
        return reverse_products(outputs, inputs, _one_hot_rows(outputs, rows), create_graph=create_graph)


class BatchedBackend(JacobianBackend):
    """All selected rows in one ``autograd.grad(..., is_grads_batched=True)`` (vmap over the backward).

    On CPU PyTorch falls back to a loop for convolution and BatchNorm backward, so it is not faster
    there; it pays off where the vmapped backward is vectorised (GPU)."""

    name = "batched"
    description = "reverse mode, all rows in one vmapped VJP (is_grads_batched)"

    def from_outputs(self, outputs: Tensor, inputs: Tensor, rows: Tensor, *, create_graph: bool) -> Tensor:
        return reverse_products(
            outputs, inputs, _one_hot_rows(outputs, rows), create_graph=create_graph, batched=True
        )


class _ColumnBackend(JacobianBackend):
    """Assembles full Jacobians column by column from ``J u`` products with basis directions."""

    requires_callable = True

    def products(self, f: Callable[[Tensor], Tensor], inputs: Tensor, directions: Tensor, create_graph: bool) -> Tensor:
        raise NotImplementedError

    def from_callable(
        self, f: Callable[[Tensor], Tensor], inputs: Tensor, rows: Tensor | None, *, create_graph: bool
    ) -> Tensor:
        d = inputs[0].numel()
        columns = [
            self.products(f, inputs, basis_directions(inputs, start, min(start + _COLUMN_CHUNK, d)), create_graph)
            for start in range(0, d, _COLUMN_CHUNK)
        ]
        full = torch.cat(columns, dim=1).transpose(1, 2)  # [B, C, D]
        rows = check_rows(rows, full.shape[0], full.shape[1], full.device)
        picked = full.gather(1, rows.unsqueeze(2).expand(-1, -1, d))
        return picked.reshape(*rows.shape, *inputs.shape[1:])


class ForwardBackend(_ColumnBackend):
    """Forward-mode AD (``torch.autograd.forward_ad``): one forward pass per input dimension."""

    name = "forward"
    description = "forward mode (one JVP per input dimension; small inputs only)"

    def products(self, f, inputs, directions, create_graph):
        return forward_products(f, inputs, directions, create_graph=create_graph)


class FiniteDifferenceBackend(_ColumnBackend):
    """Central finite differences: two evaluations per input dimension; approximate."""

    name = "finite-difference"
    description = "central finite differences (approximate; small inputs only)"

    def products(self, f, inputs, directions, create_graph):
        return finite_difference_products(f, inputs, directions, create_graph=create_graph)


#: autograd nodes whose vmapped backward PyTorch runs as a per-row loop on CPU (no batching rule)
_CPU_UNBATCHED_NODES = ("Convolution", "BatchNorm")


def _graph_contains(grad_fn, fragments: tuple[str, ...]) -> bool:
    """Whether any node of the autograd graph below ``grad_fn`` has a name containing a fragment."""
    stack, seen = [grad_fn], set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if any(fragment in node.name() for fragment in fragments):
            return True
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return False


class AutoBackend(JacobianBackend):
    """Chooses by measured cost (``jacplug bench``; figures in docs/jacobian.md, "Measured cost").

    One row: ``loop`` (a single VJP either way). Several rows on CUDA: ``batched``. Several rows on
    CPU: ``loop`` when the graph holds convolutions or BatchNorm, whose vmapped backward PyTorch
    runs as a per-row loop there, else ``batched`` (vectorised without them). Forward mode and finite
    differences are never chosen for rows: they cost one or two evaluations per input dimension.
    """

    name = "auto"
    description = "loop for one row or conv/BatchNorm graphs on CPU, else batched (by measured cost)"

    def choose(self, outputs: Tensor, n_rows: int) -> JacobianBackend:
        if n_rows == 1:
            return LoopBackend()
        if outputs.device.type == "cpu" and _graph_contains(outputs.grad_fn, _CPU_UNBATCHED_NODES):
            return LoopBackend()
        return BatchedBackend()

    def from_outputs(self, outputs: Tensor, inputs: Tensor, rows: Tensor, *, create_graph: bool) -> Tensor:
        return self.choose(outputs, rows.shape[1]).from_outputs(outputs, inputs, rows, create_graph=create_graph)


#: the built-in backends, registered by name through the built-in plugin ``jacplug.jacobian-backends``
BUILTIN_BACKENDS: tuple[type[JacobianBackend], ...] = (
    AutoBackend,
    LoopBackend,
    BatchedBackend,
    ForwardBackend,
    FiniteDifferenceBackend,
)
