"""Feature terms on hooked feature maps (``batch.student_features`` / ``batch.teacher_features``).

Keys are module names (as ``model.named_modules()`` spells them); each term's ``feature_layers`` maps
student layer -> teacher layer, so the caller knows what to tap. Feature maps are ``[B, C, H, W]``
(``fitnet`` also takes ``[B, C]``; token outputs of ViT-style models are turned into maps by
:meth:`jacplug.FeatureTap.maps`); the teacher's are read through ``.detach()`` except by
``feature-jacobian``, which differentiates them w.r.t. the inputs. When the two maps' spatial sizes
differ, both are adaptively average-pooled to the smaller height and width.

``layers`` may be a mapping, a list of names used on both sides, or a string for ``--loss`` specs:
``"layer3"``, ``"layer3+layer4"`` (same names) or ``"s_layer>t_layer+..."`` (student > teacher).
"""

from __future__ import annotations

from typing import Iterable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..engine import vjp
from ..engine.substitutions import DOUBLE_BACKWARD
from ..errors import UserError
from ..registry import ModelPair
from .base import DistillBatch, LossTerm
from .jacobian_terms import row_distance
from .values import boolean, choice, positive_float
from .teacher_rows import CACHE_GRAPH_USED


def layer_map(term: str, layers: Mapping[str, str] | Iterable[str] | str) -> dict[str, str]:
    """Student layer -> teacher layer from a mapping, a list of shared names, or a spec string."""
    if isinstance(layers, str):
        pairs = [part.split(">", 1) if ">" in part else [part, part] for part in layers.split("+")]
        result = {s.strip(): t.strip() for s, t in pairs}
    elif isinstance(layers, Mapping):
        result = {str(s): str(t) for s, t in layers.items()}
    else:
        result = {str(name): str(name) for name in layers}
    if not result or any(not s or not t for s, t in result.items()):
        raise UserError(
            f"loss term {term!r}: layers={layers!r} names no layer pair; give a mapping "
            f"{{'student_layer': 'teacher_layer'}}, or in a spec layers=layer3 or layers=s_layer>t_layer+layer4"
        )
    return result


def options_from_pair(pair: ModelPair, teacher_layers: Iterable[str] | None = None) -> dict:
    """``layers`` and ``channels`` for :class:`FitNetLoss` from a registered :class:`ModelPair`
    (which maps teacher -> student; the loss terms map student -> teacher)."""
    chosen = list(pair.layers) if teacher_layers is None else list(teacher_layers)
    unknown = [t for t in chosen if t not in pair.layers]
    if unknown:
        raise UserError(
            f"model pair {pair.teacher}->{pair.student} has no teacher layers {unknown}; it has {list(pair.layers)}"
        )
    return {
        "layers": {pair.layers[t]: t for t in chosen},
        "channels": {pair.layers[t]: tuple(pair.channels[t]) for t in chosen},
    }


def _feature(features: Mapping[str, Tensor], name: str, side: str, term: LossTerm) -> Tensor:
    if name not in features:
        raise ValueError(
            f"loss term {term.name!r} needs the {side} feature map {name!r}, but the batch has "
            f"{sorted(features) or 'none'}; tap the layers in term.feature_layers ({dict(term.feature_layers)})"
        )
    return features[name]


def _spatial(feature: Tensor, name: str, term: LossTerm, allow_vector: bool = False) -> Tensor:
    """The map as ``[B, C, H, W]``; with ``allow_vector`` a ``[B, C]`` vector becomes ``[B, C, 1, 1]``."""
    if allow_vector and feature.dim() == 2:
        return feature[:, :, None, None]
    if feature.dim() != 4:
        expected = "[B, C, H, W] or [B, C]" if allow_vector else "[B, C, H, W]"
        hint = (
            "; token outputs [B, N, D] of ViT-style models become maps through FeatureTap(...).maps() or "
            "jacplug.features.feature_map, or use jacplug.features.forward_intermediates"
            if feature.dim() == 3 else ""
        )
        raise ValueError(
            f"loss term {term.name!r}: feature map {name!r} has shape {tuple(feature.shape)}; expected {expected}{hint}"
        )
    return feature


def common_size(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor]:
    """Pool ``[B, *, H, W]`` maps to the smaller height and width of the two."""
    if a.shape[-2:] == b.shape[-2:]:
        return a, b
    size = (min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1]))
    return F.adaptive_avg_pool2d(a, size), F.adaptive_avg_pool2d(b, size)


def attention_map(feature: Tensor, p: float) -> Tensor:
    """Raw spatial attention ``[B, 1, H, W]``: the channel mean of ``|f|^p``."""
    return feature.abs().pow(p).mean(dim=1, keepdim=True)


class FitNetLoss(LossTerm):
    """FitNet hint loss: ``MSE(adapter(f_S), f_T)`` per layer pair (mean over all entries), averaged
    over the pairs.

    ``channels[student_layer] = (teacher_channels, student_channels)`` (the order of
    :class:`jacplug.registry.ModelPair`; :func:`options_from_pair` builds both options from a pair).
    Each adapter is a learnable 1x1 convolution from student to teacher width, a sub-module, so
    its weights reach the optimizer through the composite's ``parameters()`` and are saved with it;
    move the term (or composite) to the features' device and dtype with ``.to(...)`` like a model.
    """

    name = "fitnet"
    needs = frozenset({"features"})

    def __init__(
        self, layers: Mapping[str, str] | Iterable[str] | str, channels: Mapping[str, tuple[int, int]]
    ) -> None:
        super().__init__()
        self.feature_layers = layer_map(self.name, layers)
        missing = [s for s in self.feature_layers if s not in channels]
        if missing:
            raise UserError(
                f"loss term 'fitnet': channels has no entry for student layer(s) {missing}; give "
                f"channels={{'student_layer': (teacher_channels, student_channels)}} for every layer"
            )
        self.adapters = nn.ModuleList()
        for student_layer in self.feature_layers:
            teacher_ch, student_ch = (int(c) for c in channels[student_layer])
            self.adapters.append(nn.Conv2d(student_ch, teacher_ch, kernel_size=1, bias=False))

    def forward(self, batch: DistillBatch) -> Tensor:
        losses = []
        for adapter, (s_name, t_name) in zip(self.adapters, self.feature_layers.items()):
            student = _spatial(_feature(batch.student_features, s_name, "student", self), s_name, self, True)
            teacher = _spatial(_feature(batch.teacher_features, t_name, "teacher", self), t_name, self, True).detach()
            if student.shape[1] != adapter.in_channels or teacher.shape[1] != adapter.out_channels:
                raise ValueError(
                    f"loss term 'fitnet': layers {s_name!r} -> {t_name!r} have {student.shape[1]} -> "
                    f"{teacher.shape[1]} channels but the adapter was built for {adapter.in_channels} -> "
                    f"{adapter.out_channels}; fix channels[{s_name!r}] = ({teacher.shape[1]}, {student.shape[1]})"
                )
            student, teacher = common_size(adapter(student), teacher)
            losses.append(F.mse_loss(student, teacher))
        return torch.stack(losses).mean()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layers={self.feature_layers}"


class AttentionTransferLoss(LossTerm):
    """Attention transfer (Zagoruyko & Komodakis): per layer pair, ``a(f)`` = the channel mean of
    ``|f|^p`` flattened over space and unit-L2-normalised, and the loss is the batch mean of
    ``||a(f_S) - a(f_T)||_2^2`` (in ``[0, 2]``, independent of resolution), averaged over pairs.

    The authors' reference code averages over the ``H * W`` entries too (our value / ``H * W``),
    which is why their weight is about 1000; with this form a weight near 1 is comparable to ``kd``.
    """

    name = "attention"
    needs = frozenset({"features"})

    def __init__(self, layers: Mapping[str, str] | Iterable[str] | str, p: float = 2.0, eps: float = 1e-8) -> None:
        super().__init__()
        self.feature_layers = layer_map(self.name, layers)
        self.p = positive_float(self.name, "p", p)
        self.eps = positive_float(self.name, "eps", eps)

    def forward(self, batch: DistillBatch) -> Tensor:
        losses = []
        for s_name, t_name in self.feature_layers.items():
            student = _spatial(_feature(batch.student_features, s_name, "student", self), s_name, self)
            teacher = _spatial(_feature(batch.teacher_features, t_name, "teacher", self), t_name, self).detach()
            a_s, a_t = common_size(attention_map(student, self.p), attention_map(teacher, self.p))
            a_s, a_t = (F.normalize(a.flatten(1), dim=1, eps=self.eps) for a in (a_s, a_t))
            losses.append((a_s - a_t).pow(2).sum(1).mean())
        return torch.stack(losses).mean()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layers={self.feature_layers}, p={self.p:g}"


class FeatureJacobianLoss(LossTerm):
    """Jacobian matching of an intermediate attention map w.r.t. the input.

    Per layer pair, ``a(f)`` is the spatial attention map of :class:`AttentionTransferLoss` (both
    networks' maps pooled to a common size, ``[B, H*W]``) and ``g = d <r, a(f)> / d x`` ``[B, *S]``
    the input gradient of a scalar summary of it, with
    ``summary="projection"`` (default): ``r ~ N(0, I)`` drawn afresh per sample and call and shared
    by both networks, ``a`` unit-normalised: a random row of the normalised map's Jacobian (as in
    ``jacobian-projected``), so over steps all of the map's Jacobian is matched;
    ``summary="energy"``: ``r = 1`` and ``a`` raw: the gradient of the layer's activation energy,
    i.e. which input pixels drive that layer.
    Returns the batch mean of ``|| n(g_S) - n(g_T) ||^2`` (``squared=False``: the norm), ``n`` the
    unit-L2 normalisation of ``jacobian``, averaged over pairs.

    Needs ``input_grad`` and teacher features computed with grad enabled from those inputs. The
    teacher's gradient keeps (``retain_graph``) the teacher graph, which ``jacobian`` terms free: list
    this term before them in a composite.
    """

    name = "feature-jacobian"
    needs = frozenset({"features", "input_grad"})
    higher_order = frozenset({DOUBLE_BACKWARD})

    def __init__(
        self,
        layers: Mapping[str, str] | Iterable[str] | str,
        summary: str = "projection",
        p: float = 2.0,
        squared: bool = True,
        eps: float = 1e-8,
    ) -> None:
        super().__init__()
        self.feature_layers = layer_map(self.name, layers)
        self.summary = choice(self.name, "summary", summary, ("projection", "energy"))
        self.p = positive_float(self.name, "p", p)
        self.squared, self.eps = boolean(self.name, "squared", squared), positive_float(self.name, "eps", eps)

    def _maps(self, student: Tensor, teacher: Tensor) -> tuple[Tensor, Tensor]:
        a_s, a_t = common_size(attention_map(student, self.p), attention_map(teacher, self.p))
        a_s, a_t = a_s.flatten(1), a_t.flatten(1)
        if self.summary == "projection":
            a_s, a_t = F.normalize(a_s, dim=1, eps=self.eps), F.normalize(a_t, dim=1, eps=self.eps)
        return a_s, a_t

    def _teacher_gradient(self, a_t: Tensor, r: Tensor, inputs: Tensor, layer: str) -> Tensor:
        if not inputs.requires_grad or a_t.grad_fn is None:
            raise ValueError(
                f"loss term {self.name!r}: teacher feature map {layer!r} has no graph to the inputs; compute the "
                f"teacher's forward with grad enabled from inputs that require grad (teacher parameters frozen)"
            )
        return vjp(a_t, inputs, r, create_graph=False, retain_graph=True)

    def forward(self, batch: DistillBatch) -> Tensor:
        if batch.cache.get(CACHE_GRAPH_USED):
            raise ValueError(
                f"loss term {self.name!r} needs the teacher's graph from inputs to its features, but a Jacobian term "
                f"before it has already used and freed it; list {self.name!r} before the Jacobian terms"
            )
        losses = []
        for s_name, t_name in self.feature_layers.items():
            student = _spatial(_feature(batch.student_features, s_name, "student", self), s_name, self)
            teacher = _spatial(_feature(batch.teacher_features, t_name, "teacher", self), t_name, self)
            a_s, a_t = self._maps(student, teacher)
            r = torch.randn_like(a_s) if self.summary == "projection" else torch.ones_like(a_s)
            g_t = self._teacher_gradient(a_t, r, batch.inputs, t_name)
            g_s = vjp(a_s, batch.inputs, r, create_graph=True)
            distance = row_distance(g_s[:, None], g_t[:, None], normalize=True, squared=self.squared, eps=self.eps)
            losses.append(distance.mean())
        return torch.stack(losses).mean()

    def extra_repr(self) -> str:
        return f"name={self.name!r}, layers={self.feature_layers}, summary={self.summary!r}, squared={self.squared}"
