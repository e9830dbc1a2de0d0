"""Teacher-side Jacobian quantities for loss terms: computed once, without a graph, then cached.

Why a module of its own: the teacher is frozen, so its Jacobian rows need no graph; computing them
with ``create_graph=False`` frees the teacher's graph at once (docs/autograd-explained.md, section 5). After that the
graph cannot be used again, so every term goes through these helpers, which reuse what an earlier
term (or the pipeline's teacher cache) already computed and otherwise recompute the teacher from
``batch.teacher_fn``.

``batch.cache`` keys (shared with the pipeline's teacher cache, which may pre-fill the first two):

- ``"teacher_rows"``: LongTensor ``[B, R]``, the classes whose teacher rows are cached, per sample;
- ``"teacher_jacobian_rows"``: ``[B, R, *S]``, no graph:
  ``d teacher_logits[b, teacher_rows[b, r]] / d inputs[b]``;
- ``"teacher_graph_used"``: ``True`` once a term has run a graph-freeing backward pass through
  ``batch.teacher_logits``; later terms then use the cache or ``batch.teacher_fn``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..engine import jacobian, vjp
from ..engine.arguments import capturing
from .base import DistillBatch, LossTerm

CACHE_ROWS = "teacher_rows"
CACHE_JACOBIAN_ROWS = "teacher_jacobian_rows"
CACHE_GRAPH_USED = "teacher_graph_used"


def all_rows(batch_size: int, num_classes: int, device: torch.device) -> Tensor:
    """``[B, C]``: every class index for every sample."""
    return torch.arange(num_classes, device=device).expand(batch_size, num_classes)


def cached_rows(cache: dict, rows: Tensor) -> Tensor | None:
    """Teacher rows ``[B, R, *S]`` for the classes ``rows`` ``[B, R]`` when the cache holds all of
    them (in any order, per sample), else ``None``."""
    have_rows, have_jac = cache.get(CACHE_ROWS), cache.get(CACHE_JACOBIAN_ROWS)
    if have_rows is None or have_jac is None:
        return None
    match = rows.unsqueeze(-1) == have_rows.to(rows.device).unsqueeze(-2)  # [B, R, R_cached]
    # under CUDA-graph capture the check cannot read the device; the cache was built for this loss's rows
    if not capturing(rows) and not bool(match.any(-1).all()):
        return None
    index = match.int().argmax(-1)  # first cached position of each wanted class
    return have_jac[torch.arange(rows.shape[0], device=index.device).unsqueeze(1), index]


def store_rows(cache: dict, rows: Tensor, jac: Tensor) -> None:
    """Add computed teacher rows to the cache (appended to rows already there)."""
    have_rows, have_jac = cache.get(CACHE_ROWS), cache.get(CACHE_JACOBIAN_ROWS)
    if have_rows is not None and have_jac is not None:
        rows, jac = torch.cat([have_rows, rows], 1), torch.cat([have_jac, jac], 1)
    cache[CACHE_ROWS], cache[CACHE_JACOBIAN_ROWS] = rows, jac


def teacher_graph(batch: DistillBatch, term: LossTerm) -> tuple[Tensor, Tensor]:
    """``(teacher_logits [B, C], inputs [B, *S])`` joined by a graph not yet used.

    The batch's own teacher graph is handed out once (the caller frees it); after that, or when the
    teacher logits carry no graph to the inputs, the teacher is recomputed by ``batch.teacher_fn`` on
    a detached copy of the inputs.
    """
    logits = batch.teacher_logits
    fresh = logits is not None and logits.grad_fn is not None and batch.inputs.requires_grad
    if fresh and not batch.cache.get(CACHE_GRAPH_USED):
        batch.cache[CACHE_GRAPH_USED] = True
        return logits, batch.inputs
    if batch.teacher_fn is not None:
        inputs = batch.inputs.detach().requires_grad_(True)
        with torch.enable_grad():
            return batch.teacher_fn(inputs), inputs
    reason = (
        "its graph was already used by an earlier term" if fresh else "teacher_logits carry no graph to the inputs"
    )
    raise ValueError(
        f"loss term {term.name!r} needs the teacher's input Jacobian, but {reason} and batch.teacher_fn is not "
        f"set; pass teacher_fn (the frozen teacher as a callable) in the DistillBatch, or compute teacher_logits "
        f"with grad enabled from inputs that require grad, or pre-fill batch.cache[{CACHE_ROWS!r}] and "
        f"[{CACHE_JACOBIAN_ROWS!r}]"
    )


def teacher_jacobian_rows(batch: DistillBatch, rows: Tensor | None, term: LossTerm, backend: str = "auto") -> Tensor:
    """Teacher Jacobian rows ``[B, R, *S]`` without a graph; ``rows``: ``[B, R]`` classes, or
    ``None`` for all ``C`` classes (``R = C``). Reuses and fills ``batch.cache``."""
    batch_size, num_classes = batch.student_logits.shape
    wanted = rows if rows is not None else all_rows(batch_size, num_classes, batch.student_logits.device)
    found = cached_rows(batch.cache, wanted)
    if found is not None:
        return found
    logits, inputs = teacher_graph(batch, term)
    jac = jacobian(logits, inputs, rows, backend=backend, create_graph=False).detach()
    store_rows(batch.cache, wanted, jac)
    return jac


def teacher_vjp(batch: DistillBatch, v: Tensor, term: LossTerm) -> Tensor:
    """``v^T J_T`` per sample without a graph: ``v`` ``[B, k, C]`` -> ``[B, k, *S]``; from the
    cached full teacher Jacobian when present, else one VJP through the teacher."""
    batch_size, num_classes = v.shape[0], v.shape[-1]
    full = cached_rows(batch.cache, all_rows(batch_size, num_classes, v.device))
    if full is not None:
        return torch.einsum("bkc,bcn->bkn", v, full.flatten(2)).reshape(*v.shape[:2], *full.shape[2:])
    logits, inputs = teacher_graph(batch, term)
    return vjp(logits, inputs, v, create_graph=False).detach()
