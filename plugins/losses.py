"""Built-in plugin: every loss term of :mod:`jacplug.losses`, registered by name exactly as a
third-party plugin would (``--loss NAME=WEIGHT``, ``jacplug.create_loss(NAME, **options)``).

The descriptions say what each term is and which values an option takes; the defaults shown by
``jacplug plugins`` are read from each term's constructor, where they live.
"""

from __future__ import annotations

import inspect

from jacplug import hookimpl

DESCRIPTIONS = {
    "kd": "T^2 * KL(teacher || student) at temperature T (log-space targets)",
    "mse-soft": "MSE of softened probabilities",
    "ce": "cross-entropy on ground-truth labels",
    "ce-teacher": "cross-entropy on the teacher's argmax class",
    "jacobian": "Eq. 10: squared distance of unit-normalised input-Jacobian rows; classes=top1|label|topk|all",
    "jacobian-projected": "all-class ||J_S - J_T||_F^2 estimated by k random output projections (VJP)",
    "jacobian-direction": "all-class ||J_S - J_T||_F^2 estimated by k random input directions (JVP); "
    "method=forward|finite-difference, scheme=forward|central (finite differences)",
    "noisy-distill": "logit MSE on Gaussian-noised inputs (= Jacobian matching to first order)",
    "fitnet": "FitNet hint MSE through learnable 1x1 adapters; layers=..., channels={student: (t_ch, s_ch)}; "
    "e.g. fitnet=1:layers=layer3 for a registered model pair such as resnet50->resnet18, which supplies the channels",
    "attention": "attention transfer (normalised channel mean of |f|^p); layers=...; e.g. attention=1:layers=layer3 "
    "or attention=1:layers=blocks.11>layer3 (student>teacher)",
    "feature-jacobian": "matching of an attention map's input gradient; layers=..., summary=projection|energy; "
    "e.g. feature-jacobian=1:layers=layer3",
}


def defaults(term: type) -> str:
    """``"defaults: temperature=4"``: the constructor's defaults, a ``None`` one read from the class's
    ``default_<option>`` (where the temperature terms keep theirs)."""
    shown = []
    for option in inspect.signature(term).parameters.values():
        if option.default is inspect.Parameter.empty:
            continue
        value = option.default if option.default is not None else getattr(term, f"default_{option.name}", None)
        shown.append(f"{option.name}={value:g}" if isinstance(value, float) else f"{option.name}={value}")
    return f"defaults: {', '.join(shown)}" if shown else ""


@hookimpl
def register_losses(register):
    from jacplug.losses import TERMS  # torch: only when a loss is looked up, not when the CLI is built

    for name, cls in TERMS.items():
        register(name, cls, description="; ".join(filter(None, (DESCRIPTIONS[name], defaults(cls)))))
