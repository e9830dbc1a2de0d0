"""Weighted sum of loss terms, reporting each term's value every step.

Why a module: the terms (and their learnable adapters) become sub-modules, so
``composite.parameters()`` hands adapter weights to the optimizer and ``state_dict()`` saves them.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import Tensor, nn

from ..errors import UserError
from .base import DistillBatch, LossTerm, as_scalar


class WeightedLoss(nn.Module):
    """``total = sum_i weight_i * term_i(batch)``.

    ``forward`` returns ``(total, values)`` where ``values`` maps each term's key to its unweighted
    value as a Python float, for logging (:class:`jacplug.Distiller` keeps them tensors). Weights must be finite and positive: a zero weight would still pay
    for the term's computation, so leave the term out instead.
    """

    def __init__(self, terms: Mapping[str, tuple[LossTerm, float]]) -> None:
        super().__init__()
        if not terms:
            raise UserError("a loss needs at least one term, e.g. --loss kd=1")
        self.terms = nn.ModuleDict()
        self.weights: dict[str, float] = {}
        #: term key -> " (registered by plugin 'x')" for terms built through the registry (see :meth:`origin`)
        self.origins: dict[str, str] = {}
        for key, (term, weight) in terms.items():
            if not isinstance(term, nn.Module):
                raise UserError(f"loss term {key!r} is a {type(term).__name__}, not a torch.nn.Module; a term is a "
                                "jacplug.losses.LossTerm (an nn.Module whose forward returns a scalar)")
            weight = float(weight)
            if not (weight > 0 and weight < float("inf")):
                raise UserError(f"loss term {key!r} has weight {weight}; weights must be finite and > 0")
            self.terms[key] = term
            self.weights[key] = weight

    @property
    def needs(self) -> frozenset[str]:
        """Union of what the terms need, so callers prepare the batch once."""
        return frozenset().union(*(term.needs for term in self.terms.values()))

    @property
    def higher_order(self) -> frozenset[str]:
        """Union of the terms' higher-order derivatives of the student (``"double_backward"``,
        ``"forward_ad"``), so callers run the student's forward accordingly."""
        return frozenset().union(*(term.higher_order for term in self.terms.values()))

    @property
    def feature_layers(self) -> dict[str, str]:
        """Student layer -> teacher layer, over every feature term."""
        layers: dict[str, str] = {}
        for term in self.terms.values():
            layers.update(term.feature_layers)
        return layers

    def forward(self, batch: DistillBatch) -> tuple[Tensor, dict[str, float]]:
        values = {key: as_scalar(term(batch), term, self.origin(key)) for key, term in self.terms.items()}
        return self.weighted_sum(values), {key: float(value.detach()) for key, value in values.items()}

    def origin(self, key: str) -> str:
        """Where term ``key`` came from, for error messages: the plugin that registered it, or nothing."""
        return self.origins.get(key, "")

    def weighted_sum(self, values: Mapping[str, Tensor]) -> Tensor:
        """``sum_i weight_i * values[i]`` over each term's unweighted scalar value, on the graph; no host
        synchronisation, so a CUDA graph can capture it."""
        return torch.stack([self.weights[key] * value for key, value in values.items()]).sum()

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={w:g}" for k, w in self.weights.items())

