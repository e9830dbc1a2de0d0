"""Built-in plugin: every loss term of :mod:`jacplug.losses`, registered by name exactly as a
third-party plugin would (``--loss NAME=WEIGHT``, ``jacplug.create_loss(NAME, **options)``)."""

from __future__ import annotations

from jacplug import hookimpl

DESCRIPTIONS = {
    "kd": "T^2 * KL(teacher || student) at temperature T (log-space targets); temperature=4",
    "mse-soft": "MSE of softened probabilities; temperature=4",
    "ce": "cross-entropy on ground-truth labels; label_smoothing=0",
    "ce-teacher": "cross-entropy on the teacher's argmax class; temperature=1",
    "jacobian": "Eq. 10: squared distance of unit-normalised input-Jacobian rows; classes=top1|label|topk|all, "
    "k=1, squared=true, eps=1e-8, backend=auto",
    "jacobian-projected": "all-class ||J_S - J_T||_F^2 estimated by k random output projections (VJP); k=1, "
    "normalize=false",
    "jacobian-direction": "all-class ||J_S - J_T||_F^2 estimated by k random input directions (JVP); k=1, "
    "method=forward|finite-difference, scheme=forward|central (finite differences), step=none, normalize=false",
    "noisy-distill": "logit MSE on Gaussian-noised inputs (= Jacobian matching to first order); sigma=0.1, samples=1",
    "fitnet": "FitNet hint MSE through learnable 1x1 adapters; layers=..., channels={student: (t_ch, s_ch)}; "
    "e.g. fitnet=1:layers=layer3 for a registered model pair such as resnet50->resnet18, which supplies the channels",
    "attention": "attention transfer (normalised channel mean of |f|^p); layers=..., p=2; e.g. attention=1:layers=layer3 "
    "or attention=1:layers=blocks.11>layer3 (student>teacher)",
    "feature-jacobian": "matching of an attention map's input gradient; layers=..., summary=projection|energy, "
    "squared=true; e.g. feature-jacobian=1:layers=layer3",
}


@hookimpl
def register_losses(register):
    from jacplug.losses import TERMS  # torch: only when a loss is looked up, not when the CLI is built

    for name, cls in TERMS.items():
        register(name, cls, description=DESCRIPTIONS[name])
