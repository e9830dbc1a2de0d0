"""The compared distillation methods, as ``--loss``-style specs built through the loss registry.

Why specs rather than term objects: the same strings work with ``jacplug train --loss``, so a reader
can rerun any cell of the table as one training run, and the JSON records exactly what ran.

Hyper-parameters (chosen on the validation split, see :mod:`.protocol`):

- ``jacobian``: weight ``lambda`` of the Eq. 10 term (top-1 teacher row, squared distance of
  unit-normalised rows, values in ``[0, 4]``) added to ``kd`` at weight 1;
- ``projected``: weight of ``jacobian-projected`` with ``normalize=true`` (one random class mixture
  per sample and step, unit-normalised like Eq. 10, so the same grid of weights is meaningful; the
  raw Frobenius form has a scale that depends on the models and the input size);
- ``attention``: weight of attention transfer (values in ``[0, 2]``);
- ``noisy``: weight of ``noisy-distill`` at the experiment's ``noisy_sigma`` (squared logit distance on
  Gaussian-perturbed inputs, one draw per image and step). Srinivas & Fleuret show that this equals
  output matching plus ``sigma^2`` times full Jacobian matching to first order, which is why the noise
  experiment sets it beside the two Jacobian terms. ``kd+noisy-jacobian`` reuses the weight chosen for
  ``kd+noisy`` and keeps only that first-order Jacobian part: ``jacobian-projected`` (an unbiased
  one-projection estimate of ``||J_S - J_T||_F^2``, not normalised) at weight ``noisy * sigma^2``, so
  the two differ by the higher-order terms and by the logit matching that KD already does;
- ``preset``: the ratio ``lambda`` of the package's default preset, spelled as ``jacplug train`` runs it:
  ``kd=0.5`` plus ``jacobian=0.5 * lambda`` (``jacobian_distillation(alpha=0.5, jacobian_scale=lambda)``).

``kd+attention+jacobian`` reuses the weights chosen for ``kd+attention`` and ``kd+jacobian`` (the
pair is not tuned jointly, to keep selection cheap).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Protocol

from ..errors import UserError

Weights = Mapping[str, float]


class Options(Protocol):
    """What a method's specs read from the experiment's options (an :class:`~.config.ExperimentConfig`)."""

    temperature: float
    attention_layers: str
    noisy_sigma: float


@dataclass(frozen=True)
class Method:
    """``name``: the key used on the command line and in the JSON; ``label``: the plot legend;
    ``specs(weights, config)``: the loss specs; ``uses``: the weights ``specs`` reads;
    ``tunes``: the weight it selects (``None``: nothing to select)."""

    name: str
    label: str
    specs: Callable[[Weights, Options], list[str]]
    uses: tuple[str, ...] = ()
    tunes: str | None = None


def _kd(c: Options, weight: float = 1.0) -> str:
    return f"kd={weight:g}:temperature={c.temperature:g}"


def _attention(w: Weights, c: Options) -> str:
    return f"attention={w['attention']:g}:layers={c.attention_layers}"


METHODS: dict[str, Method] = {
    m.name: m
    for m in (
        Method("ce", "student alone (CE)", lambda w, c: ["ce=1"]),
        Method("kd", "KD", lambda w, c: [_kd(c)]),
        Method("kd+jacobian", "KD + Jacobian (Eq. 10)",
               lambda w, c: [_kd(c), f"jacobian={w['jacobian']:g}"], ("jacobian",), "jacobian"),
        Method("kd+projected", "KD + projected Jacobian",
               lambda w, c: [_kd(c), f"jacobian-projected={w['projected']:g}:normalize=true"],
               ("projected",), "projected"),
        Method("kd+attention", "KD + attention", lambda w, c: [_kd(c), _attention(w, c)],
               ("attention",), "attention"),
        Method("kd+attention+jacobian", "KD + attention + Jacobian",
               lambda w, c: [_kd(c), _attention(w, c), f"jacobian={w['jacobian']:g}"],
               ("attention", "jacobian")),
        Method("kd+noisy", "KD + noisy-input distillation",
               lambda w, c: [_kd(c), f"noisy-distill={w['noisy']:g}:sigma={c.noisy_sigma:g}"], ("noisy",), "noisy"),
        Method("kd+noisy-jacobian", "KD + σ²·Frobenius Jacobian (noisy distillation to first order)",
               lambda w, c: [_kd(c), f"jacobian-projected={w['noisy'] * c.noisy_sigma ** 2:g}:normalize=false"],
               ("noisy",)),
        Method("preset", "default preset, kd=0.5 + jacobian=0.5λ",
               lambda w, c: [_kd(c, 0.5), f"jacobian={0.5 * w['preset']:g}"], ("preset",), "preset"),
    )
}

#: the methods of the few-sample experiment, run when ``--methods`` is not given
FEW_SHOT_METHODS = ("ce", "kd", "kd+jacobian", "kd+projected", "kd+attention", "kd+attention+jacobian")


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise UserError(f"unknown method {name!r}; choose from {', '.join(METHODS)}")
    return METHODS[name]
