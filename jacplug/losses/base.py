"""The loss-term contract: what a term receives (:class:`DistillBatch`) and what it returns.

Why a batch object instead of positional arguments: terms need different things (logits, labels,
feature maps, the models themselves for forward-mode or finite-difference Jacobians, cached teacher
rows). Each term declares what it needs in ``needs`` so the caller (the pipeline, the torchdistill
bridge, or a user's own loop) prepares exactly that, e.g. makes ``inputs`` require grad only when
some term needs input Jacobians.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from torch import Tensor, nn

from ..errors import PluginError

#: the things a term may declare in ``needs``
NEEDS = frozenset(
    {
        "student_logits",  # [B, C], on the student's graph
        "teacher_logits",  # [B, C], no graph
        "targets",  # [B] integer labels
        "input_grad",  # inputs require grad and student_logits were computed from them
        "student_fn",  # the student as a callable x -> logits (forward mode, finite differences, noise)
        "teacher_fn",  # the teacher as a callable (frozen; terms call it under their own grad mode)
        "features",  # student_features / teacher_features for the layers in ``feature_layers``
    }
)


@dataclass
class DistillBatch:
    """Everything a loss term may read for one step.

    ``inputs``: ``[B, *S]``; requires grad when a term needs ``input_grad``.
    ``student_logits`` / ``teacher_logits``: ``[B, C]``; the teacher's carries no graph unless a term
    asked the caller to keep it (teacher Jacobian rows are computed by the term itself).
    ``student_features`` / ``teacher_features``: module name -> on-graph feature map ``[B, ...]``.
    ``cache``: per-sample precomputed teacher quantities (e.g. ``"teacher_jacobian_rows"``
    ``[B, R, *S]`` and ``"teacher_rows"`` ``[B, R]``) when the pipeline's teacher cache is on.
    """

    inputs: Tensor
    student_logits: Tensor
    teacher_logits: Tensor | None = None
    targets: Tensor | None = None
    student_fn: Callable[[Tensor], Tensor] | None = None
    teacher_fn: Callable[[Tensor], Tensor] | None = None
    student_features: Mapping[str, Tensor] = field(default_factory=dict)
    teacher_features: Mapping[str, Tensor] = field(default_factory=dict)
    cache: dict[str, Any] = field(default_factory=dict)
    #: ``student_logits`` / ``teacher_logits`` equal ``student_fn(inputs)`` / ``teacher_fn(inputs)``
    #: to rounding, so a forward finite difference may reuse them; ``False`` when the logits come
    #: from a mixed-precision forward and the callables run in full precision
    logits_match_fns: bool = True


class LossTerm(nn.Module):
    """One scalar loss term. Subclasses set ``name`` and ``needs`` and implement ``forward``.

    A term is an ``nn.Module`` so learnable parts (feature adapters) are registered parameters
    that reach the optimizer through ``composite.parameters()``.
    """

    name: str = "loss"
    needs: frozenset[str] = frozenset()
    #: which derivatives of the student beyond the first the term takes: ``"double_backward"``
    #: (back-propagating through ``ds/dx``) and/or ``"forward_ad"`` (through a forward-mode tangent);
    #: the caller then runs the student so those exist (:mod:`jacplug.engine.substitutions`)
    higher_order: frozenset[str] = frozenset()
    #: student layer name -> teacher layer name, for terms that read feature maps
    feature_layers: Mapping[str, str] = {}

    def forward(self, batch: DistillBatch) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"name={self.name!r}"


def require(batch: DistillBatch, term: LossTerm, *fields: str) -> None:
    """Fail clearly when the caller did not supply what ``term`` declared it needs."""
    missing = [f for f in fields if getattr(batch, f, None) is None]
    if missing:
        raise ValueError(
            f"loss term {term.name!r} needs {', '.join(missing)} in the DistillBatch, but it was not "
            f"provided; the term declares needs={sorted(term.needs)}"
        )


def as_scalar(value: Tensor, term: LossTerm, origin: str = "") -> Tensor:
    """``value``, checked to be the scalar tensor a term must return; ``origin`` (e.g. " (registered by
    plugin 'x')") says where the term came from, so a plugin's bug names the plugin. A Python type and
    shape check: no host synchronisation, so it costs nothing per step and a CUDA graph can capture it."""
    if not isinstance(value, Tensor):
        raise PluginError(f"loss term {term.name!r}{origin} returned {type(value).__name__}, not a tensor; a term's "
                          "forward must return a scalar torch.Tensor")
    if value.dim() != 0:
        raise PluginError(f"loss term {term.name!r}{origin} returned shape {tuple(value.shape)}, not a scalar; "
                          "reduce it (e.g. .mean()) in the term's forward")
    if not value.is_floating_point():
        raise PluginError(f"loss term {term.name!r}{origin} returned a {value.dtype} tensor, which has no gradient; "
                          "return a floating-point scalar")
    return value

