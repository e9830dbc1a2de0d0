"""Loss terms for distillation with Jacobian matching, usable by name (registry) or imported directly.

Every term is an ``nn.Module`` taking a :class:`DistillBatch` and returning a scalar; combine them with
:class:`WeightedLoss` (or :func:`jacobian_distillation`, the default preset, or :func:`build_loss` from
``name=weight`` specs).
"""

from .base import NEEDS, DistillBatch, LossTerm
from .composite import WeightedLoss
from .extra_evaluation import extra_evaluation, isolated_running_stats
from .distill import CrossEntropyLoss, KDLoss, SoftMSELoss, TeacherCELoss
from .feature_terms import AttentionTransferLoss, FeatureJacobianLoss, FitNetLoss, options_from_pair
from .jacobian_terms import DirectionalJacobianLoss, JacobianLoss, NoisyDistillLoss, ProjectedJacobianLoss
from .presets import build_loss, jacobian_distillation, parse_spec

#: every built-in term class, by registered name
TERMS = {
    cls.name: cls
    for cls in (
        KDLoss,
        SoftMSELoss,
        CrossEntropyLoss,
        TeacherCELoss,
        JacobianLoss,
        ProjectedJacobianLoss,
        DirectionalJacobianLoss,
        NoisyDistillLoss,
        FitNetLoss,
        AttentionTransferLoss,
        FeatureJacobianLoss,
    )
}

__all__ = [
    "NEEDS",
    "TERMS",
    "AttentionTransferLoss",
    "CrossEntropyLoss",
    "DirectionalJacobianLoss",
    "DistillBatch",
    "FeatureJacobianLoss",
    "FitNetLoss",
    "JacobianLoss",
    "KDLoss",
    "LossTerm",
    "NoisyDistillLoss",
    "ProjectedJacobianLoss",
    "SoftMSELoss",
    "TeacherCELoss",
    "WeightedLoss",
    "build_loss",
    "extra_evaluation",
    "isolated_running_stats",
    "jacobian_distillation",
    "options_from_pair",
    "parse_spec",
]
