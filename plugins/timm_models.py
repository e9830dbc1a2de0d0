"""Built-in plugin: every timm model by name, plus recommended teacher/student pairings.

timm is imported inside the factories, not at module top level, so ``jacplug plugins`` and other
commands that never build a model do not pay timm's import time.
"""

from __future__ import annotations

from jacplug import hookimpl
from jacplug.registry import ModelPair


def create_timm_model(name: str, *, num_classes: int, in_chans: int = 3, pretrained: bool = False, **kwargs):
    """``timm.create_model`` with the classifier sized for ``num_classes``.

    ``pretrained=True`` downloads weights (needs internet); the classifier is re-initialised when the
    class count differs from the checkpoint's, as timm does. ``kwargs`` go to the model's constructor
    (``--student-kwargs``; the pipeline adds ``img_size`` for models that take it): a key it does not
    take raises ``TypeError`` before anything is built, which the pipeline turns into a one-line error.
    """
    import timm

    return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, in_chans=in_chans, **kwargs)


def _is_timm_model(name: str) -> bool:
    import timm

    return timm.is_model(name)


def _timm_names() -> list[str]:
    import timm

    return timm.list_models()


_RESNET_LAYERS = ("layer1", "layer2", "layer3", "layer4")
#: output channels of layer1..layer4
_RESNET_CHANNELS = {
    "resnet18": (64, 128, 256, 512),
    "resnet34": (64, 128, 256, 512),
    "resnet50": (256, 512, 1024, 2048),
    "resnet101": (256, 512, 1024, 2048),
}
_PAIRS = [
    ("resnet50", "resnet18"),
    ("resnet34", "resnet18"),
    ("resnet50", "resnet34"),
    ("resnet101", "resnet50"),
    ("resnet101", "resnet18"),
]


def _pair_factory(teacher: str, student: str):
    def build() -> ModelPair:
        t, s = _RESNET_CHANNELS[teacher], _RESNET_CHANNELS[student]
        return ModelPair(
            teacher=teacher,
            student=student,
            layers={layer: layer for layer in _RESNET_LAYERS},
            channels={layer: (tc, sc) for layer, tc, sc in zip(_RESNET_LAYERS, t, s)},
        )

    return build


@hookimpl
def register_models(register):
    register(
        "*",
        create_timm_model,
        accepts=_is_timm_model,
        catalog=_timm_names,
        description="any timm model (timm.create_model); pretrained weights need internet",
    )


@hookimpl
def register_model_pairs(register):
    for teacher, student in _PAIRS:
        register(
            f"{teacher}->{student}",
            _pair_factory(teacher, student),
            description=f"{teacher} stages layer1-4 -> {student} stages layer1-4",
        )
