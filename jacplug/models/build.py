"""Build the run's models from a registry name and constructor kwargs, sized for the data, and prove
they run at the data's input size before anything is trained.

- ``img_size``: models whose constructor takes it (timm's ViT, DeiT, CaiT, Swin, PiT, LeViT, Mixer,
  ...) get the run's input size unless the kwargs set it. Whether a constructor takes it is read from
  the built model's constructor signatures, its base classes' included (:func:`takes_img_size`); such
  a model is built again with it, from the same random state, so the weights are those a single build
  at that size gives. The kwargs a model was built with, ``img_size`` included, are what checkpoints
  record (:attr:`BuiltModel.kwargs`).
- A kwarg the constructor does not take, or a construction that fails on the user's kwargs, is a
  one-line :class:`UserError` naming the model and the key.
- Input size: a one-image forward of zeros in eval mode, without grad, at the run's input size. If it
  fails (a kernel larger than the feature map, a model fixed to another ``img_size``), the same
  probe runs at the sizes of :data:`SIZE_LADDER` (rebuilding the model at each size when ``img_size``
  is set automatically) and the error names the smallest that works. The probe draws no random
  numbers and restores the model's train/eval mode.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field
from typing import Any, Callable, NoReturn

import torch
from torch import nn

from ..errors import UserError
from ..registry import create_model
from ..data.datasets import DatasetSplits

#: input sizes tried when a model cannot run at the run's size: every 8 px to 64, every 16 to 256,
#: every 32 to 512 (sizes are compared at these steps, so "smallest" means smallest on this ladder)
SIZE_LADDER = (*range(8, 65, 8), *range(80, 257, 16), *range(288, 513, 32))

_UNEXPECTED = re.compile(r"unexpected keyword argument '(\w+)'")


@dataclass(frozen=True)
class ModelInput:
    """What building a model needs to know of its data, for callers without a dataset (the benchmark):
    the class count and the input shape ``(C, H, W)``; :class:`~.data.DatasetSplits` has the same."""

    num_classes: int
    input_shape: tuple[int, int, int]

    @property
    def in_chans(self) -> int:
        return self.input_shape[0]


@dataclass(frozen=True)
class BuiltModel:
    """A model and every keyword argument its factory received besides ``num_classes``,
    ``in_chans`` and ``pretrained`` (the user's kwargs plus an automatic ``img_size``)."""

    module: nn.Module
    kwargs: dict[str, Any] = field(default_factory=dict)


def _kwargs_flag(role: str) -> str:
    return f"--{role}-kwargs" if role in ("student", "teacher") else "its kwargs"


def describe(role: str, name: str, kwargs: dict[str, Any]) -> str:
    """``student 'vit_tiny_patch16_224' (patch_size=4, img_size=32)``, for messages."""
    args = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
    return f"{role} {name!r}" + (f" ({args})" if args else "")


def _unexpected_key(exc: BaseException) -> str | None:
    match = _UNEXPECTED.search(str(exc)) if isinstance(exc, TypeError) else None
    return match.group(1) if match else None


def takes_img_size(model: nn.Module) -> bool:
    """Whether the model's constructor accepts an ``img_size`` parameter (timm's ViT, Swin, PiT, LeViT,
    Mixer, ...). Read from the signatures, not from trying: a constructor that takes ``**kwargs`` may word
    its refusal of an unknown key in any way (timm's MetaFormer family does). The class hierarchy is
    walked: a subclass whose ``__init__`` takes ``**kwargs`` hands them on to its base (timm's
    ``LevitDistilled`` to ``Levit``), so its own signature alone does not say."""
    for cls in type(model).__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:  # inherited: the next class in the MRO defines it
            continue
        if cls in (nn.Module, object):
            return False
        try:
            parameters = inspect.signature(init).parameters
        except (TypeError, ValueError):  # a signature Python cannot read (a builtin class)
            return False
        if "img_size" in parameters:
            return True
        if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
            return False  # unknown keywords stop here
    return False


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())[:240]}"


def _create(name: str, splits: DatasetSplits, kwargs: dict[str, Any], pretrained: bool = False) -> nn.Module:
    return create_model(name, num_classes=splits.num_classes, in_chans=splits.in_chans, pretrained=pretrained,
                        **kwargs)


def _runs_at(model: nn.Module, in_chans: int, size: int) -> BaseException | None:
    """None when a one-image forward at ``size`` x ``size`` succeeds, else the exception it raised."""
    was_training = model.training
    try:
        with torch.no_grad():
            model.eval()(torch.zeros(1, in_chans, size, size))
    except Exception as exc:  # any failure means "does not run at this size"
        return exc
    finally:
        model.train(was_training)
    return None


def smallest_working_size(make: Callable[[int], nn.Module], in_chans: int, skip: int) -> int | None:
    """The first size of :data:`SIZE_LADDER` (other than ``skip``) at which ``make(size)`` builds a
    model that runs a one-image forward, or None."""
    for size in SIZE_LADDER:
        if size == skip:
            continue
        try:
            model = make(size)
        except Exception:
            continue
        if _runs_at(model, in_chans, size) is None:
            return size
    return None


def build_model(
    role: str,
    name: str,
    splits: DatasetSplits | ModelInput,
    kwargs: dict[str, Any] | None = None,
    *,
    pretrained: bool = False,
) -> BuiltModel:
    """Build ``name`` for ``splits`` (classes, channels, input size) with the user's ``kwargs``, and
    check that it runs at the splits' input size (see the module docstring).

    ``role`` (``"student"``/``"teacher"``) names the model and its option in messages.
    """
    user = dict(kwargs or {})
    height, width = splits.input_shape[1:]
    auto_size = "img_size" not in user
    chosen = user
    state = torch.random.get_rng_state()
    try:
        model = _create(name, splits, user, pretrained)
        if auto_size and takes_img_size(model):  # build it again for the run's size, from the same seed
            chosen = {**user, "img_size": height if height == width else [height, width]}
            torch.random.set_rng_state(state)
            model = _create(name, splits, chosen, pretrained)
    except UserError:
        raise
    except Exception as exc:
        _construction_failed(role, name, splits, user, auto_size and chosen is not user, pretrained, exc)
    auto_size = chosen is not user  # img_size was set here: the size search rebuilds at each size
    if height == width:  # every built-in dataset is square; the size search assumes it
        failure = _runs_at(model, splits.in_chans, height)
        if failure is not None:
            _too_small(role, name, splits, user, auto_size, model, failure)
    return BuiltModel(model, chosen)


def _construction_failed(role: str, name: str, splits: DatasetSplits, user: dict[str, Any], auto_size: bool,
                         pretrained: bool, exc: Exception) -> NoReturn:
    """Raise the one-line error for a constructor that failed, or ``exc`` itself when no user input caused it."""
    key = _unexpected_key(exc)
    if key is not None and key in user:
        raise UserError(
            f"{role} model {name!r} does not take the keyword argument {key!r} (from --{role} NAME:KEY=VALUE or {_kwargs_flag(role)}); "
            "drop it, or check the model's constructor for the right name"
        ) from exc
    if pretrained:
        raise UserError(
            f"could not load pretrained weights for {name!r} ({_one_line(exc)}); --pretrained needs internet "
            "access and a model with published weights; drop --pretrained to train the teacher from scratch"
        ) from exc
    if auto_size:  # the automatic img_size may be what the constructor refused
        _too_small(role, name, splits, user, auto_size, None, exc, give_up=False)
    if user:
        raise UserError(f"could not build {describe(role, name, user)}: {_one_line(exc)}") from exc
    raise exc


def _too_small(role: str, name: str, splits: DatasetSplits, user: dict[str, Any], auto_size: bool,
               model: nn.Module | None, failure: BaseException, give_up: bool = True) -> None:
    """The one-line error for a model that cannot run at the run's input size, naming the smallest
    size that works. Without one, raise a size error when ``give_up``, else return."""
    height, width = splits.input_shape[1:]

    def make(size: int) -> nn.Module:
        if auto_size or model is None:
            return _create(name, splits, {**user, "img_size": size})
        return model

    with torch.random.fork_rng(devices=[]):  # rebuilding for the search must not shift the run's seeds
        smallest = smallest_working_size(make, splits.in_chans, skip=height)
    what = f"{describe(role, name, user)} cannot run on {height}x{width} inputs ({_one_line(failure)})"
    if smallest is not None:
        raise UserError(f"{what}; the smallest input size that works is {smallest} px: pass --image-size {smallest}") from failure
    if give_up:
        raise UserError(
            f"{what}, nor at any size from {SIZE_LADDER[0]} to {SIZE_LADDER[-1]} px; check {_kwargs_flag(role)}"
        ) from failure
