"""The compared distillation methods, as ``--loss``-style specs built through the loss registry.

Why specs rather than term objects: the same strings work with ``jacplug train --loss``, so a reader
can rerun any cell of the table as one training run, and the JSON records exactly what ran.

Hyper-parameters (chosen on the validation split, see :mod:`.runs`):

- ``jacobian``: weight ``lambda`` of the Eq. 10 term (top-1 teacher row, squared distance of
  unit-normalised rows, values in ``[0, 4]``) added to ``kd`` at weight 1;
- ``projected``: weight of ``jacobian-projected`` with ``normalize=true`` (one random class mixture
  per sample and step, unit-normalised like Eq. 10, so the same grid of weights is meaningful; the
  raw Frobenius form has a scale that depends on the models and the input size);
- ``attention``: weight of attention transfer (values in ``[0, 2]``).

``kd+attention+jacobian`` reuses the weights chosen for ``kd+attention`` and ``kd+jacobian`` (the
pair is not tuned jointly, to keep selection cheap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping

from ..errors import UserError

Weights = Mapping[str, float]


@dataclass(frozen=True)
class Method:
    """``name``: the key used on the command line and in the JSON; ``label``: the plot legend;
    ``specs(weights, temperature, layers)``: the loss specs; ``uses``: the weights ``specs`` reads;
    ``tunes``: the weight it selects (``None``: nothing to select)."""

    name: str
    label: str
    specs: Callable[[Weights, float, str], list[str]]
    uses: tuple[str, ...] = ()
    tunes: str | None = None


def _kd(t: float) -> str:
    return f"kd=1:temperature={t:g}"


def _attention(w: Weights, layers: str) -> str:
    return f"attention={w['attention']:g}:layers={layers}"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ce", "student alone (CE)", lambda w, t, layers: ["ce=1"]),
        Method("kd", "KD", lambda w, t, layers: [_kd(t)]),
        Method("kd+jacobian", "KD + Jacobian (Eq. 10)",
               lambda w, t, layers: [_kd(t), f"jacobian={w['jacobian']:g}"], ("jacobian",), "jacobian"),
        Method("kd+projected", "KD + projected Jacobian",
               lambda w, t, layers: [_kd(t), f"jacobian-projected={w['projected']:g}:normalize=true"],
               ("projected",), "projected"),
        Method("kd+attention", "KD + attention", lambda w, t, layers: [_kd(t), _attention(w, layers)],
               ("attention",), "attention"),
        Method("kd+attention+jacobian", "KD + attention + Jacobian",
               lambda w, t, layers: [_kd(t), _attention(w, layers), f"jacobian={w['jacobian']:g}"],
               ("attention", "jacobian")),
    )
}


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]
