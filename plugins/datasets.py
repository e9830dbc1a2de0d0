"""Built-in plugin: the embedded digits, CIFAR-10/100 (torchvision) and ``imagefolder:PATH``.

Registered exactly like a third-party dataset plugin; the factories live in
:mod:`jacplug.data.datasets` and import torchvision only when called.
"""

from __future__ import annotations

from jacplug import hookimpl


def _digits(**options):
    from jacplug.data.datasets import digits

    return digits(**options)


def _cifar(name: str):
    def build(**options):
        from jacplug.data.datasets import cifar

        return cifar(name, **options)

    return build


def _imagefolder(name: str, **options):
    from jacplug.data.datasets import imagefolder

    return imagefolder(name, **options)


@hookimpl
def register_datasets(register):
    register(
        "digits",
        _digits,
        description="embedded UCI handwritten digits (1,797 8x8 images, CC BY 4.0), upsampled; no download",
    )
    for name in ("cifar10", "cifar100"):
        register(name, _cifar(name), description=f"{name.upper()} via torchvision (--data-root, --download)")
    register(
        "imagefolder:*",
        _imagefolder,
        catalog=lambda: ["imagefolder:PATH"],
        description="class sub-folders under PATH (or PATH/train, PATH/val, PATH/test)",
    )
