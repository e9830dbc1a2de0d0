"""Prove that every loss term reaches the parameters it should train, and name the ones that do not.

A term can look fine (finite value, ``requires_grad=True``) and still train nothing: a Jacobian
computed with ``retain_graph=True`` but without ``create_graph=True`` has no graph; setting
``jacobian.requires_grad = True`` on it makes a *new leaf* whose graph starts at itself; a feature
captured under ``torch.no_grad()`` or ``.detach()``-ed is cut off. Summed into a total with a
healthy term, the total still backpropagates, so training runs and silently ignores the broken term.

The check differentiates each term on its own with ``torch.autograd.grad(..., retain_graph=True,
allow_unused=True)``: the caller's graph survives (call ``total.backward()`` afterwards as usual)
and no ``.grad`` field is touched.

Policy: a term with *no path* to the parameters is an error (:class:`jacplug.DetachedLossError`
naming every such term). A term whose gradient is *exactly zero* (or not finite) is reported and
warned about (:class:`SuspiciousGradientWarning`) but not raised: zero is legitimate at a minimum
(a student that equals its teacher) and for a dead ReLU batch, whereas no path never is.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import Tensor, nn

from ..errors import DetachedLossError, UserError

__all__ = [
    "TermFlow",
    "SuspiciousGradientWarning",
    "flow_report",
    "gradient_flow",
    "raise_for_detached",
    "format_flow_table",
]

Parameters = nn.Module | Mapping[str, Tensor] | Iterable[Tensor]


class SuspiciousGradientWarning(UserWarning):
    """A loss term reaches the parameters but its gradient is exactly zero or not finite."""


@dataclass(frozen=True)
class TermFlow:
    """One term's result. ``status``: ``"ok"``, ``"zero"``, ``"nonfinite"`` or ``"detached"``.

    ``norm`` is the L2 norm of the term's gradient over all parameters (``None`` when detached);
    ``reached`` counts the parameter tensors with a non-``None`` gradient, out of ``total``.
    """

    name: str
    value: float
    norm: float | None
    reached: int
    total: int
    status: str
    reason: str = ""


def flow_report(terms: Mapping[str, Tensor], parameters: Parameters) -> list[TermFlow]:
    """Each named scalar term's gradient norm w.r.t. ``parameters``, with a status; raises nothing for detached terms.

    ``terms``: name -> scalar tensor (each *unweighted* term, not only the total: a total with one
    healthy term always has a path). ``parameters``: a module, a ``name -> tensor`` mapping, or an
    iterable of tensors; only those with ``requires_grad=True`` count (frozen ones cannot be trained).
    """
    params = _trainable(parameters)
    report = []
    for name, term in terms.items():
        if not isinstance(term, Tensor) or term.numel() != 1:
            shape = tuple(term.shape) if isinstance(term, Tensor) else type(term).__name__
            raise UserError(f"loss term {name!r} must be a scalar tensor, got {shape}; reduce it (e.g. .mean()) first")
        value = float(term.detach())
        if term.grad_fn is None:
            why = (
                "it is a leaf: requires_grad was set on a computed tensor, which starts a new graph"
                if term.requires_grad
                else "it has no graph: computed under torch.no_grad(), .detach()-ed, or from a Jacobian "
                "taken without create_graph=True"
            )
            report.append(TermFlow(name, value, None, 0, len(params), "detached", why))
            continue
        try:
            grads = torch.autograd.grad(term.reshape(()), params, retain_graph=True, allow_unused=True)
        except RuntimeError as error:
            if "backward through the graph a second time" in str(error):
                raise UserError(
                    f"loss term {name!r}: its graph was already freed by an earlier backward(); run the "
                    f"gradient-flow check before backward(), or backward(retain_graph=True)"
                ) from error
            raise
        present = [g for g in grads if g is not None]
        if not present:
            why = (
                "its graph does not reach the parameters: e.g. `jacobian.requires_grad = True` on a computed "
                "Jacobian (a new leaf), or features/Jacobians detached before the loss"
            )
            report.append(TermFlow(name, value, None, 0, len(params), "detached", why))
            continue
        norm = math.sqrt(sum(float(g.detach().double().pow(2).sum()) for g in present))
        if not math.isfinite(norm):
            status, why = "nonfinite", "the gradient has NaN/inf entries (e.g. normalising an all-zero Jacobian row)"
        elif norm == 0.0:
            status, why = "zero", "the gradient is exactly zero (at a minimum, or dead activations in this batch)"
        else:
            status, why = "ok", ""
        report.append(TermFlow(name, value, norm, len(present), len(params), status, why))
    return report


def gradient_flow(terms: Mapping[str, Tensor], parameters: Parameters) -> dict[str, float]:
    """``{term name: gradient norm}`` for each named scalar term, w.r.t. ``parameters``.

    Raises :class:`jacplug.DetachedLossError` naming *every* term with no autograd path to the
    parameters, and warns (:class:`SuspiciousGradientWarning`) about terms whose gradient is exactly
    zero or not finite. The caller's graph is kept and ``.grad`` fields are untouched, so call it on
    the first batch, then ``backward()`` as usual. See :func:`flow_report` for the arguments.
    """
    report = flow_report(terms, parameters)
    raise_for_detached(report)
    suspicious = [f"{r.name} ({r.reason})" for r in report if r.status in ("zero", "nonfinite")]
    if suspicious:
        warnings.warn("suspicious loss-term gradients: " + "; ".join(suspicious), SuspiciousGradientWarning, stacklevel=2)
    return {r.name: float(r.norm) for r in report if r.norm is not None}


def raise_for_detached(report: list[TermFlow]) -> None:
    """Raise :class:`jacplug.DetachedLossError` naming every detached term in ``report``, if any."""
    detached = [r for r in report if r.status == "detached"]
    if detached:
        detail = "; ".join(f"{r.name}: {r.reason}" for r in detached)
        raise DetachedLossError([r.name for r in detached], detail + "; compute Jacobians with create_graph=True "
                                "(jacplug.jacobian does) and keep features on the graph (jacplug.FeatureTap)")


def format_flow_table(report: list[TermFlow], weights: Mapping[str, float] | None = None) -> str:
    """A plain-text table of ``report`` for the CLI: term, weight, value, gradient norm, reached, status.

    ``weights`` (term name -> weight) adds the weight and the weighted gradient norm, which shows
    whether a term would vanish next to or drown the others.
    """
    header = ["term", "value", "grad norm", "params reached", "status"]
    if weights is not None:
        header[1:1] = ["weight"]
        header[4:4] = ["weighted norm"]
    rows = [header]
    for r in report:
        norm = "-" if r.norm is None else f"{r.norm:.4g}"
        status = r.status if not r.reason else f"{r.status}: {r.reason}"
        row = [r.name, f"{r.value:.4g}", norm, f"{r.reached}/{r.total}", status]
        if weights is not None:
            weight = weights.get(r.name)
            row[1:1] = ["-" if weight is None else f"{weight:g}"]
            weighted = "-" if weight is None or r.norm is None else f"{weight * r.norm:.4g}"
            row[4:4] = [weighted]
        rows.append(row)
    widths = [max(len(row[i]) for row in rows) for i in range(len(header) - 1)]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) + "  " + row[-1] for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths) + "  " + "-" * len(header[-1]))
    return "\n".join(line.rstrip() for line in lines)


def _trainable(parameters: Parameters) -> list[Tensor]:
    if isinstance(parameters, nn.Module):
        candidates = list(parameters.parameters())
    elif isinstance(parameters, Mapping):
        candidates = list(parameters.values())
    elif isinstance(parameters, Tensor):
        candidates = [parameters]
    else:
        candidates = list(parameters)
    seen: set[int] = set()
    params = []
    for p in candidates:
        if not isinstance(p, Tensor):
            raise UserError(f"parameters must be tensors, a name->tensor mapping or a module; got {type(p).__name__}")
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            params.append(p)
    if not params:
        raise UserError(
            "none of the given parameters requires grad, so no term can train them; pass the student's "
            "(and adapters') parameters, not the frozen teacher's"
        )
    return params
