"""A loss term with a common mistake (docs/autograd-explained.md, section 2), and a plugin
registering it, for CLI tests."""

from __future__ import annotations

from jacplug import hookimpl
from jacplug.losses import LossTerm


class DetachedTerm(LossTerm):
    """The mistake: a computed value made a new leaf with ``requires_grad = True``."""

    name = "detached"
    needs = frozenset({"student_logits"})

    def forward(self, batch):
        value = batch.student_logits.detach().pow(2).mean()
        value.requires_grad = True
        return value


class DetachedPlugin:
    @hookimpl
    def register_losses(self, register):
        register("detached", DetachedTerm)
