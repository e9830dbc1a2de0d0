"""Every jacplug error survives pickling as itself, message and attributes included: errors raised in
``jacplug experiment``'s worker processes reach the parent (a pool whose result thread fails to unpickle
an error leaves its parent waiting forever)."""

from __future__ import annotations

import importlib
import pickle
import pkgutil

import pytest

import jacplug
import jacplug_plugins
from jacplug.errors import DetachedLossError, UnknownNameError, UserError
from jacplug.io.files import NotAFile, WriteFailed

#: constructor arguments of the errors whose constructor is not Exception's (message -> error)
SPECIAL = {
    UnknownNameError: ("model", "resnet5O", ["resnet50", "resnet18"], "a hint"),
    DetachedLossError: (["jacobian", "fitnet"], "a detail"),
    WriteFailed: ("run/config.json", OSError(27, "File too large")),
    NotAFile: ("run/metrics.jsonl", "a symbolic link"),
}


def every_user_error() -> list[type]:
    for package in (jacplug, jacplug_plugins):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            if module.name.endswith("__main__"):
                continue  # running it is the CLI
            if "integrations" in module.name or "torchdistill" in module.name:
                try:  # optional frameworks: their modules' errors count where the framework is installed
                    importlib.import_module(module.name)
                except ImportError:
                    continue
            else:
                importlib.import_module(module.name)
    found, stack = [], [UserError]
    while stack:
        cls = stack.pop()
        found.append(cls)
        stack.extend(cls.__subclasses__())
    return sorted({c for c in found if c.__module__.startswith(("jacplug", "jacplug_plugins"))}, key=str)


@pytest.mark.parametrize("cls", every_user_error(), ids=lambda c: c.__name__)
def test_the_error_survives_pickling(cls):
    custom = any("__init__" in vars(base) for base in cls.__mro__ if base.__module__.startswith("jacplug"))
    if cls in SPECIAL:
        error = cls(*SPECIAL[cls])
    else:
        assert not custom, f"{cls.__name__} has its own constructor: add its arguments to SPECIAL"
        error = cls("what was wrong; what would be right")
    error.extra = 42
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is cls and str(copy) == str(error) and copy.args == error.args and copy.extra == 42
    if cls is UnknownNameError:
        assert copy.suggestions == error.suggestions and "resnet50" in copy.suggestions and copy.name == "resnet5O"
    if cls is DetachedLossError:
        assert copy.detached == ["jacobian", "fitnet"]
