"""On-graph capture of intermediate feature maps.

Two ways to get a model's intermediate outputs *with their autograd graph*, so a feature loss
(FitNet, attention transfer, feature-Jacobian matching) trains the student:

- :class:`FeatureTap`, a context manager over forward hooks, for any ``nn.Module``;
- :func:`forward_intermediates`, for timm models that offer ``forward_intermediates`` (no hooks, so
  it also works under ``torch.func`` transforms).

The tap never detaches. It refuses, with a message saying what to do instead, the ways hook-based
features silently lose their gradient or their values: capture under ``torch.no_grad()``, a captured
tensor changed in place afterwards (timm's ``ReLU(inplace=True)`` right after a hooked BatchNorm), a
module that fires twice in one forward, ``nn.DataParallel`` (hooks on its replicas never reach
the wrapper) and a ``torch.compile``'d wrapper (hooks inside a compiled graph are traced, not run).

Token models (ViT, DeiT, CaiT, Mixer, LeViT) produce ``[B, N, D]`` tokens and Swin ``[B, H, W, C]``
maps; :func:`feature_map` (and :meth:`FeatureTap.maps`) turns them into ``[B, C, H, W]`` maps where
the model says how, which is what the feature loss terms take.
"""

from __future__ import annotations

import sys
from typing import Any, Iterable, Iterator, Sequence

import torch
from torch import Tensor, nn

from .errors import UnknownNameError, UserError

__all__ = ["FeatureTap", "FeatureTapError", "disable_inplace", "feature_map", "forward_intermediates"]


class FeatureTapError(UserError):
    """A feature capture that would lose the graph or the values the user asked for."""


class FeatureTap:
    """Record the outputs of named sub-modules during forward passes, keeping their graph.

    Example::

        with FeatureTap(student, ["layer3", "layer4"]) as tap:
            logits = student(x)
            loss = fitnet(tap["layer3"], teacher_feature)   # on-graph: reaches student params

    Semantics:

    - ``tap[name]`` is the module's output tensor as produced (``[B, ...]``), never detached. With
      ``keep_all=True`` it is the list of outputs, one per call, in call order.
    - Captures are reset at the start of every forward of ``model`` itself (a forward pre-hook on the
      root), so in a training loop the tap always holds the latest forward's features and nothing
      from the previous step keeps its graph alive. Call :meth:`clear` yourself only when you call
      sub-modules directly instead of ``model(x)``.
    - Hooks are registered on ``__enter__`` and removed on ``__exit__``, also when the block raises.
      Captures stay readable after the block, until the next ``__enter__`` or :meth:`clear`.
    - ``requires_grad=True`` (the default, for a student) refuses a capture that carries no graph:
      one made under ``torch.no_grad()``/``torch.inference_mode()``, or of a tensor that does not
      require grad. Pass ``requires_grad=False`` for a frozen teacher, whose features are targets
      and need no graph.

    Refusals, all :class:`jacplug.UserError`: unknown module names (:class:`jacplug.UnknownNameError`,
    with the closest matches); and as :class:`FeatureTapError`: ``nn.DataParallel`` models, a
    graph-less capture (see above), a module firing twice in one forward without ``keep_all=True``,
    and reading a tensor that was modified in place after capture (detected through its version
    counter).

    Hand loss code a snapshot, ``tap.features()`` (outputs as produced) or ``tap.maps()`` (token
    outputs as ``[B, C, H, W]`` maps, see :func:`feature_map`), rather than the tap itself: a later
    forward of the same model (e.g. on noise-perturbed inputs inside a loss term) resets the tap.
    """

    def __init__(
        self,
        model: nn.Module,
        names: Sequence[str],
        *,
        keep_all: bool = False,
        requires_grad: bool = True,
    ) -> None:
        if isinstance(model, nn.DataParallel):
            raise FeatureTapError(
                "FeatureTap cannot hook an nn.DataParallel model: its forward runs on per-device "
                "replicas, so hooks on the wrapped modules never see the features and the gathered "
                "result has no tap; use DistributedDataParallel (one process per device) or tap the "
                "model before wrapping it in DataParallel and run it unwrapped"
            )
        if _is_compiled(model):
            raise FeatureTapError(
                "FeatureTap cannot hook a torch.compile'd model (an OptimizedModule): inside a compiled graph "
                "hooks are traced rather than run, so captures go missing or arrive twice; tap and run the "
                "uncompiled model (compiled._orig_mod), or capture features without hooks through "
                "jacplug.features.forward_intermediates inside the compiled function"
            )
        if isinstance(names, str):
            names = [names]
        self._root = _unwrap_ddp(model)
        modules = dict(self._root.named_modules())
        modules.pop("", None)  # the root's output is what the caller already gets back
        unknown = [n for n in names if n not in modules]
        if unknown:
            raise UnknownNameError(
                "module", unknown[0], modules, hint=f"in {type(self._root).__name__}; names are as in model.named_modules()"
            )
        if len(set(names)) != len(names):
            raise FeatureTapError(f"module names given twice: {list(names)}")
        if not names:
            raise FeatureTapError("FeatureTap needs at least one module name, e.g. ['layer3']")
        self.names: tuple[str, ...] = tuple(names)
        self.keep_all = keep_all
        self.requires_grad = requires_grad
        self._modules = {n: modules[n] for n in self.names}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        # name -> list of (output, version counters of its tensors at capture time)
        self._captured: dict[str, list[tuple[Any, list[int | None]]]] = {}
        self._input_size: tuple[int, int] | None = None  # [H, W] of the latest forward's input

    # -- context manager -------------------------------------------------------------------------
    def __enter__(self) -> FeatureTap:
        if self._handles:
            raise FeatureTapError("this FeatureTap is already active; nest a second FeatureTap instead of re-entering")
        self.clear()
        try:
            self._handles.append(self._root.register_forward_pre_hook(self._on_forward))
            for name, module in self._modules.items():
                self._handles.append(module.register_forward_hook(self._make_hook(name)))
        except BaseException:
            self._remove_hooks()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._remove_hooks()

    @property
    def active(self) -> bool:
        """True while the hooks are registered (inside the ``with`` block)."""
        return bool(self._handles)

    def clear(self) -> None:
        """Drop every capture (and with it the reference to its graph)."""
        self._captured = {}

    # -- reading ---------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> Any:
        """The captured output of ``name`` (a list of outputs with ``keep_all=True``), version-checked."""
        if name not in self._modules:
            raise UnknownNameError("tapped module", name, self.names, hint="tap it by adding it to FeatureTap(model, names)")
        records = self._captured.get(name)
        if not records:
            raise FeatureTapError(
                f"module {name!r} has produced no output since the tap was entered or cleared: run the "
                f"model's forward inside the `with FeatureTap(...)` block before reading tap[{name!r}]"
            )
        for index, (output, versions) in enumerate(records):
            _check_versions(name, index, output, versions)
        outputs = [output for output, _ in records]
        return outputs if self.keep_all else outputs[0]

    def __contains__(self, name: object) -> bool:
        return name in self._captured

    def __iter__(self) -> Iterator[str]:
        return (n for n in self.names if n in self._captured)

    def __len__(self) -> int:
        return len(self._captured)

    def features(self) -> dict[str, Any]:
        """``{name: tap[name]}`` for every module that fired, as the modules produced them."""
        return {name: self[name] for name in self}

    def maps(self) -> dict[str, Any]:
        """Like :meth:`features`, with token and channels-last outputs turned into ``[B, C, H, W]``
        maps by :func:`feature_map` (``[B, C]`` vectors and ``[B, C, H, W]`` maps pass through): what the
        feature loss terms take, e.g. for ``DistillBatch.student_features``. With ``keep_all=True``,
        each call's output is converted."""
        result = {}
        for name in self:
            outputs = self[name] if self.keep_all else [self[name]]
            converted = [feature_map(self._root, name, output, self._input_size) for output in outputs]
            result[name] = converted if self.keep_all else converted[0]
        return result

    # -- internals -------------------------------------------------------------------------------
    def _on_forward(self, module: nn.Module, args: tuple) -> None:
        """A new forward of the model: drop the previous captures, remember the input's height and width."""
        self.clear()
        first = args[0] if args else None
        self._input_size = tuple(first.shape[-2:]) if isinstance(first, Tensor) and first.dim() >= 3 else None

    def _make_hook(self, name: str):
        def hook(module: nn.Module, args: Any, output: Any) -> None:
            if self.requires_grad:
                _check_graph(name, output)
            records = self._captured.setdefault(name, [])
            if records and not self.keep_all:
                raise FeatureTapError(
                    f"module {name!r} ran twice in one forward of {type(self._root).__name__} (a shared or "
                    f"re-used module), so tap[{name!r}] would be ambiguous; pass keep_all=True to get every "
                    f"output as a list, or tap a module that runs once. If you call sub-modules directly "
                    f"rather than model(x), call tap.clear() between calls"
                )
            records.append((output, [_version(t) for t in _tensors(output)]))

        return hook

    def _remove_hooks(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "inactive"
        return f"FeatureTap({type(self._root).__name__}, {list(self.names)}, keep_all={self.keep_all}, {state})"


def disable_inplace(model: nn.Module) -> list[str]:
    """Set ``inplace=False`` on every sub-module that has ``inplace=True`` (``nn.ReLU``, timm acts, dropout).

    Returns the names of the modules changed. Why: an in-place activation right after a tapped
    module overwrites the captured tensor (``bn1`` output becomes ``relu(bn1)``). This costs one
    extra activation buffer per such module and does not change the model's outputs. In-place
    arithmetic inside ``forward`` (e.g. ``x += shortcut`` in residual blocks) is not a module and
    cannot be switched off this way: tap the block's output instead.
    """
    changed = []
    for name, module in model.named_modules():
        if getattr(module, "inplace", False) is True:
            module.inplace = False
            changed.append(name)
    return changed


def forward_intermediates(
    model: nn.Module, x: Tensor, layers: str | int | Iterable[str | int]
) -> tuple[Tensor, dict[str, Tensor]]:
    """Logits and named intermediate features of a timm model, through its own ``forward_intermediates``.

    ``x``: ``[B, *S]``. ``layers``: module names from ``model.feature_info`` (e.g. ``"layer3"`` for a
    ResNet) or feature indices into it. Returns ``(logits [B, C], {name: feature [B, ...]})``, all on
    the graph. No hooks are involved, so this also works inside ``torch.func`` transforms
    (``jacrev``, ``vmap``, ``functional_call``). The logits are ``model.forward_head`` of the final
    features, equal to ``model(x)``.
    """
    if not callable(getattr(model, "forward_intermediates", None)) or not callable(getattr(model, "forward_head", None)):
        raise FeatureTapError(
            f"{type(model).__name__} has no forward_intermediates/forward_head (timm >= 1.0 models have them); "
            f"use FeatureTap(model, names) instead"
        )
    info = getattr(model, "feature_info", None)
    if not info:
        raise FeatureTapError(f"{type(model).__name__} has no feature_info to name its intermediates; use FeatureTap")
    known = [entry["module"] for entry in info]
    if isinstance(layers, (str, int)):
        layers = [layers]
    wanted: dict[int, str] = {}
    for layer in layers:
        if isinstance(layer, int):
            if not -len(known) <= layer < len(known):
                raise FeatureTapError(f"feature index {layer} out of range for {len(known)} features: {known}")
            index = layer % len(known)
        elif layer in known:
            index = known.index(layer)
        else:
            raise UnknownNameError("feature", str(layer), known, hint="forward_intermediates names come from model.feature_info")
        wanted[index] = known[index]
    if not wanted:
        raise FeatureTapError(f"forward_intermediates needs at least one layer, one of {known}")
    indices = sorted(wanted)
    final, intermediates = model.forward_intermediates(x, indices=indices)
    logits = model.forward_head(final)
    return logits, {wanted[i]: feature for i, feature in zip(indices, intermediates)}


def feature_map(model: nn.Module, name: str, output: Any, input_size: Sequence[int] | None = None) -> Tensor:
    """The output of ``model``'s sub-module ``name`` as a ``[B, C, H, W]`` map, using what the model says
    about its layout; on the graph (a view or reshape, never a copy that detaches).

    - ``[B, C, H, W]`` and ``[B, C]`` pass through, except on models that declare channels-last
      features (timm's ``output_fmt == "NHWC"``, e.g. Swin): there the module must be listed in
      ``model.feature_info``, whose ``num_chs`` tells which axis holds the channels.
    - ``[B, N, D]`` tokens (ViT, DeiT, CaiT, Mixer, LeViT): the leading ``model.num_prefix_tokens``
      (class, distillation and register tokens; a layer without them, like CaiT's patch blocks, is
      recognised by its token count) are dropped and the rest are laid out row by row on the patch
      grid: ``model.patch_embed.dynamic_feat_size(input_size)`` for ``dynamic_img_size`` models,
      else ``model.patch_embed.grid_size``, else ``input_size`` divided by the module's ``reduction``
      in ``model.feature_info``. A ``transformers`` model (ViT, DeiT, ...) states its grid in its
      config (``input_size`` or ``config.image_size`` over ``config.patch_size``) and its prefix
      tokens as its embeddings' ``cls_token``, ``distillation_token`` and ``register_tokens``.
      ``input_size`` is the ``(H, W)`` of the model's input (:class:`FeatureTap` records it at
      every forward).

    Anything else raises :class:`FeatureTapError` (timm's ``forward_intermediates`` returns maps for
    every timm model; see :func:`forward_intermediates`).
    """
    if not isinstance(output, Tensor):
        raise FeatureTapError(
            f"module {name!r} returned a {type(output).__name__}, not a tensor, so it has no feature map; tap "
            f"a module that returns one tensor, or use jacplug.features.forward_intermediates"
        )
    info = {entry["module"]: entry for entry in _feature_info(model)}
    if output.dim() == 4 and getattr(model, "output_fmt", None) == "NHWC":
        channels = info.get(name, {}).get("num_chs")
        if channels is not None and output.shape[-1] == channels:
            return output.permute(0, 3, 1, 2)
        if channels is not None and output.shape[1] == channels:
            return output
        raise FeatureTapError(
            f"{type(model).__name__} keeps its features channels-last, and module {name!r} of shape "
            f"{tuple(output.shape)} is not in its feature_info ({sorted(info)}), so its channel axis is unknown; "
            f"tap one of those modules, or use jacplug.features.forward_intermediates"
        )
    if output.dim() != 3:
        return output
    batch, tokens, dim = output.shape
    prefix = _prefix_tokens(model)
    grids = _token_grids(model, info.get(name), input_size)
    for rows, columns in grids:
        for skip in dict.fromkeys((prefix, 0)):
            if tokens == skip + rows * columns:
                return output[:, skip:].transpose(1, 2).reshape(batch, dim, rows, columns)
    declared = ", ".join(f"{rows}x{columns}" for rows, columns in grids) or "none"
    raise FeatureTapError(
        f"module {name!r} of {type(model).__name__} gives {tokens} tokens of width {dim}, which do not fill the "
        f"patch grid the model declares ({declared}) after its {prefix} prefix token(s); tap a layer that keeps "
        f"all patch tokens, or use jacplug.features.forward_intermediates"
    )


def _feature_info(model: nn.Module) -> list[dict]:
    info = getattr(model, "feature_info", None)
    return [entry for entry in info if isinstance(entry, dict) and "module" in entry] if isinstance(info, list) else []


def _token_grids(model: nn.Module, entry: dict | None, input_size: Sequence[int] | None) -> list[tuple[int, int]]:
    """Candidate ``(rows, columns)`` patch grids, in the order the model states them."""
    grids: list[tuple[int, int]] = []
    patch_embed = getattr(model, "patch_embed", None)
    if input_size is not None and getattr(model, "dynamic_img_size", False) and hasattr(patch_embed, "dynamic_feat_size"):
        grids.append(tuple(int(n) for n in patch_embed.dynamic_feat_size(tuple(input_size))))
    if getattr(patch_embed, "grid_size", None) is not None:
        grids.append(tuple(int(n) for n in patch_embed.grid_size))
    if input_size is not None and entry is not None and entry.get("reduction"):
        r = int(entry["reduction"])
        grids += [(input_size[0] // r, input_size[1] // r), (-(-input_size[0] // r), -(-input_size[1] // r))]
    config = getattr(model, "config", None)  # a transformers model's configuration
    patch = getattr(config, "patch_size", None)
    if patch is not None:
        rows, columns = _pair(patch)
        image = getattr(config, "image_size", None)
        for size in (input_size, None if image is None else _pair(image)):
            if size is not None:
                grids.append((int(size[0]) // rows, int(size[1]) // columns))
    return list(dict.fromkeys(grids))


#: the parameters a transformers vision transformer's embeddings put before the patch tokens
_PREFIX_PARAMETERS = frozenset({"cls_token", "distillation_token", "register_tokens"})


def _prefix_tokens(model: nn.Module) -> int:
    """The tokens before the patches: timm's ``num_prefix_tokens``; for a model without it (a
    ``transformers`` one, which states a ``config``), its ``[1, n, D]`` class, distillation and
    register token parameters."""
    declared = getattr(model, "num_prefix_tokens", None)
    if declared is not None or getattr(model, "config", None) is None:
        return int(declared or 0)
    return sum(int(p.shape[1]) for n, p in model.named_parameters()
               if p.dim() == 3 and n.rpartition(".")[2] in _PREFIX_PARAMETERS)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _is_compiled(model: nn.Module) -> bool:
    """A ``torch.compile`` wrapper; checked without importing torch._dynamo (nothing is compiled unless it was)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(model, getattr(eval_frame, "OptimizedModule", ()))


def _unwrap_ddp(model: nn.Module) -> nn.Module:
    """DDP runs its module in this process, so hooks on ``model.module`` see the real features."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return model.module
    return model


def _tensors(output: Any) -> list[Tensor]:
    """The tensors in a module output (a tensor, or tuples/lists/dicts of them)."""
    if isinstance(output, Tensor):
        return [output]
    if isinstance(output, (tuple, list)):
        return [t for item in output for t in _tensors(item)]
    if isinstance(output, dict):
        return [t for item in output.values() for t in _tensors(item)]
    return []


def _version(tensor: Tensor) -> int | None:
    # inference tensors carry no version counter; nothing can modify them in place after capture anyway
    return None if tensor.is_inference() else tensor._version


def _check_graph(name: str, output: Any) -> None:
    if not torch.is_grad_enabled():
        mode = "torch.inference_mode()" if torch.is_inference_mode_enabled() else "torch.no_grad()"
        raise FeatureTapError(
            f"module {name!r} ran under {mode}, so its captured output has no graph and a loss on it "
            f"would not train anything; run the forward with grad enabled, or, for a frozen teacher whose "
            f"features are only targets, create the tap with FeatureTap(..., requires_grad=False)"
        )
    tensors = [t for t in _tensors(output) if t.is_floating_point() or t.is_complex()]
    if tensors and not any(t.requires_grad for t in tensors):
        raise FeatureTapError(
            f"the output of module {name!r} does not require grad (its parameters and its input are all "
            f"frozen, or it was detached), so a loss on it would not train anything; unfreeze the parameters "
            f"before it, or pass requires_grad=False if these are a frozen teacher's target features"
        )


def _check_versions(name: str, index: int, output: Any, versions: list[int | None]) -> None:
    for tensor, version in zip(_tensors(output), versions):
        if version is not None and tensor._version != version:
            call = f" (call {index})" if index else ""
            raise FeatureTapError(
                f"the output of module {name!r}{call} was modified in place after it was captured (version "
                f"{version} -> {tensor._version}), so tap[{name!r}] now holds different values than the module "
                f"produced: typically an in-place activation right after it, such as timm's ReLU(inplace=True) "
                f"after BatchNorm, or `x += shortcut`; tap the activation or the enclosing block instead, set "
                f"inplace=False on the activation, or call jacplug.features.disable_inplace(model) first"
            )
