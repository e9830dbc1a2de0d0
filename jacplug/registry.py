"""Name registries filled by pluggy plugins loaded from the ``jacplug`` entry-point group.

Why this shape: built-in models, losses, Jacobian backends and datasets register through exactly the
hooks third-party plugins use (``jacplug.hookspecs``), and are found through the same entry-point
group, so the path plugin authors rely on is exercised by every run. Loading is lazy (nothing is
imported until a registry is first read) and each plugin is isolated: one that fails to import or
raises in a hook is reported with its name, distribution and version and skipped, unless
``JACPLUG_STRICT_PLUGINS=1``. ``JACPLUG_PLUGINS=a,b`` limits which entry points load (an empty value
loads none).
"""

from __future__ import annotations

import fnmatch
import os
import warnings
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from typing import Any, Callable, Iterator

import pluggy

from . import hookspecs
from .errors import DuplicateNameError, PluginError, UnknownNameError

ENTRY_POINT_GROUP = "jacplug"

#: registry kind -> (registration hook, singular label used in messages)
KINDS: dict[str, tuple[str, str]] = {
    "models": ("register_models", "model"),
    "model_pairs": ("register_model_pairs", "model pair"),
    "losses": ("register_losses", "loss"),
    "jacobian_backends": ("register_jacobian_backends", "Jacobian backend"),
    "datasets": ("register_datasets", "dataset"),
    "op_substitutions": ("register_op_substitutions", "op substitution"),
}
LIFECYCLE_HOOKS = ("on_train_start", "on_step_end", "on_epoch_end", "on_train_end")


class PluginWarning(UserWarning):
    """A plugin was skipped because it failed; the message names it and the error."""


def strict_plugins() -> bool:
    return os.environ.get("JACPLUG_STRICT_PLUGINS", "").strip().lower() in {"1", "true", "yes", "on"}


@dataclass(frozen=True)
class Entry:
    """One registered name: what builds it and which plugin supplied it."""

    name: str
    factory: Callable[..., Any]
    plugin: str
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def is_pattern(self) -> bool:
        return any(ch in self.name for ch in "*?[")

    @property
    def description(self) -> str:
        return str(self.metadata.get("description", ""))


@dataclass(frozen=True)
class ModelPair:
    """A recommended teacher/student pairing for feature losses.

    ``layers`` maps teacher module names to the student module names whose outputs correspond;
    ``channels`` maps each teacher layer to ``(teacher_channels, student_channels)`` so an adapter
    (e.g. a 1x1 conv from student to teacher width) can be built without a trial forward pass.
    """

    teacher: str
    student: str
    layers: dict[str, str]
    channels: dict[str, tuple[int, int]]


class Registry:
    """Names of one kind (models, losses, ...) mapped to factories, with pattern entries and
    close-match suggestions for unknown names."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.label = KINDS[kind][1] if kind in KINDS else kind
        self._entries: dict[str, Entry] = {}

    def add(self, name: str, factory: Callable[..., Any], plugin: str, **metadata: Any) -> None:
        """Register ``name``; a second registration is an error naming both plugins unless the
        later one passes ``override=True``."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"{self.label} names must be non-empty strings, got {name!r} from plugin {plugin!r}")
        if not callable(factory):
            raise TypeError(f"{self.label} {name!r} from plugin {plugin!r}: factory must be callable, got {factory!r}")
        override = bool(metadata.pop("override", False))
        old = self._entries.get(name)
        if old is not None and not override:
            raise DuplicateNameError(
                f"{self.label} {name!r} is registered by plugin {old.plugin!r} and again by plugin "
                f"{plugin!r}; pass override=True in the later register() call to replace it"
            )
        self._entries[name] = Entry(name, factory, plugin, metadata)

    def remove_plugin(self, plugin: str) -> None:
        self._entries = {k: e for k, e in self._entries.items() if e.plugin != plugin}

    def __contains__(self, name: str) -> bool:
        try:
            self.get(name)
        except UnknownNameError:
            return False
        return True

    def __iter__(self) -> Iterator[Entry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def names(self, pattern: str | None = None) -> list[str]:
        """Registered exact names, plus the names pattern entries serve, optionally filtered by a
        wildcard ``pattern`` (like ``timm.list_models("resnet*")``)."""
        names = {e.name for e in self._entries.values() if not e.is_pattern}
        if pattern is not None:
            for entry in self._entries.values():
                catalog = entry.metadata.get("catalog")
                if entry.is_pattern and catalog is not None:
                    names.update(n for n in catalog() if fnmatch.fnmatch(n, entry.name))
            names = {n for n in names if fnmatch.fnmatch(n, pattern)}
        return sorted(names)

    def get(self, name: str) -> Entry:
        entry = self._entries.get(name)
        if entry is not None:
            return entry
        known = self.names()
        for candidate in self._entries.values():
            if not (candidate.is_pattern and fnmatch.fnmatch(name, candidate.name)):
                continue
            accepts = candidate.metadata.get("accepts")
            if accepts is None or accepts(name):
                return candidate
            catalog = candidate.metadata.get("catalog")
            if catalog is not None:
                known = known + list(catalog())
        hint = f"list them with `jacplug plugins`" if known else "no plugin registered any; see `jacplug plugins`"
        raise UnknownNameError(self.label, name, known, hint=hint)

    def create(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """Build ``name``: pattern entries receive the requested name as first argument."""
        entry = self.get(name)
        if entry.is_pattern:
            return entry.factory(name, *args, **kwargs)
        return entry.factory(*args, **kwargs)


@dataclass
class PluginInfo:
    """What ``jacplug plugins`` shows for one plugin."""

    name: str
    distribution: str | None = None
    version: str | None = None
    module: str | None = None
    hooks: list[str] = field(default_factory=list)
    registered: dict[str, list[str]] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "hooks": self.hooks,
            "registered": self.registered,
            "error": self.error,
        }


class PluginHost:
    """A pluggy ``PluginManager`` plus the registries its plugins fill.

    Tests and embedding applications may create their own host (``PluginHost(load_entry_points=False)``)
    and ``register`` plugin objects in-process; the module-level :func:`get_host` serves the CLI.
    """

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.failed: dict[str, PluginInfo] = {}
        self._load_entry_points = load_entry_points
        self._loaded = False
        self._registries: dict[str, Registry] | None = None

    # -- loading -------------------------------------------------------------------------------
    def _fail(self, info: PluginInfo, stage: str, exc: BaseException) -> None:
        info.error = f"{type(exc).__name__}: {exc}"
        self.failed[info.name] = info
        origin = f" (distribution {info.distribution} {info.version})" if info.distribution else ""
        message = f"plugin {info.name!r}{origin} failed {stage}: {info.error}"
        if strict_plugins():
            raise PluginError(message) from exc
        warnings.warn(
            message + "; skipped (set JACPLUG_STRICT_PLUGINS=1 to make this fatal)", PluginWarning, stacklevel=3
        )

    def load(self) -> None:
        """Load entry-point plugins once (idempotent)."""
        if self._loaded:
            return
        self._loaded = True
        if not self._load_entry_points:
            return
        allowed = os.environ.get("JACPLUG_PLUGINS")
        allowed_names = None if allowed is None else {n.strip() for n in allowed.split(",") if n.strip()}
        eps = sorted(entry_points(group=ENTRY_POINT_GROUP), key=_builtin_first)
        for ep in eps:
            if allowed_names is not None and ep.name not in allowed_names:
                continue
            dist = getattr(ep, "dist", None)
            info = PluginInfo(
                name=ep.name,
                distribution=dist.name if dist else None,
                version=dist.version if dist else None,
                module=ep.value,
            )
            if ep.name in self.plugins:
                self._fail(info, "to load", ValueError(f"entry point name {ep.name!r} is already used by "
                                                        f"distribution {self.plugins[ep.name].distribution}"))
                continue
            try:
                plugin = ep.load()
                self.pm.register(plugin, name=ep.name)
            except Exception as exc:  # any plugin failure must not break the host
                self._fail(info, "to load", exc)
                continue
            self.plugins[ep.name] = info

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register a plugin object (module, class or instance with ``@hookimpl`` methods) in-process."""
        self.load()
        name = self.pm.register(plugin, name=name)
        if name is None:
            raise ValueError("pluggy refused the plugin (it is blocked)")
        self.plugins[name] = PluginInfo(name=name, module=getattr(plugin, "__name__", type(plugin).__name__))
        self._registries = None
        return name

    def unregister(self, name: str) -> None:
        self.pm.unregister(name=name)
        self.plugins.pop(name, None)
        self.failed.pop(name, None)
        self._registries = None

    # -- registries ----------------------------------------------------------------------------
    def _collect(self) -> dict[str, Registry]:
        registries = {kind: Registry(kind) for kind in KINDS}
        for info in self.plugins.values():
            info.hooks, info.registered = [], {}
        for name in list(self.plugins):
            info = self.plugins[name]
            plugin = self.pm.get_plugin(name)
            info.hooks = sorted(
                hc.name for hc in (self.pm.get_hookcallers(plugin) or []) if hc.name in _ALL_HOOKS
            )
            try:
                for kind, (hook_name, _) in KINDS.items():
                    for impl in getattr(self.pm.hook, hook_name).get_hookimpls():
                        if impl.plugin_name == name:
                            impl.function(register=_registrar(registries[kind], name, info, kind))
            except Exception as exc:
                for registry in registries.values():
                    registry.remove_plugin(name)
                self.plugins.pop(name)
                self._fail(info, f"in a registration hook", exc)
        return registries

    def registry(self, kind: str) -> Registry:
        if kind not in KINDS:
            raise UnknownNameError("registry kind", kind, KINDS)
        self.load()
        if self._registries is None:
            self._registries = self._collect()
        return self._registries[kind]

    # -- lifecycle ----------------------------------------------------------------------------
    def notify(self, hook_name: str, **kwargs: Any) -> None:
        """Call a lifecycle hook on every plugin, isolating failures per plugin."""
        if hook_name not in LIFECYCLE_HOOKS:
            raise ValueError(f"unknown lifecycle hook {hook_name!r}; expected one of {LIFECYCLE_HOOKS}")
        self.load()
        for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()):
            try:
                impl.function(**{k: kwargs[k] for k in impl.argnames})
            except Exception as exc:
                info = self.plugins.get(impl.plugin_name, PluginInfo(name=impl.plugin_name))
                self._fail(info, f"in {hook_name}", exc)


_ALL_HOOKS = {spec for spec, _ in KINDS.values()} | set(LIFECYCLE_HOOKS)


def _builtin_first(ep) -> tuple[int, str]:
    dist = getattr(ep, "dist", None)
    return (0 if dist is not None and dist.name == "jacplug" else 1, ep.name)


def _registrar(registry: Registry, plugin: str, info: PluginInfo, kind: str) -> Callable[..., None]:
    def register(name: str, factory: Callable[..., Any], **metadata: Any) -> None:
        registry.add(name, factory, plugin, **metadata)
        info.registered.setdefault(kind, []).append(name)

    return register


_HOST: PluginHost | None = None


def get_host() -> PluginHost:
    """The process-wide plugin host (created, not loaded, on first call)."""
    global _HOST
    if _HOST is None:
        _HOST = PluginHost()
    return _HOST


def reset_host(host: PluginHost | None = None) -> PluginHost | None:
    """Replace the process-wide host (tests use this); returns the previous one."""
    global _HOST
    previous, _HOST = _HOST, host
    return previous


def registry(kind: str) -> Registry:
    return get_host().registry(kind)


def create_model(name: str, **kwargs: Any):
    """Build a registered model (any timm name through the built-in timm plugin)."""
    return registry("models").create(name, **kwargs)


def create_loss(name: str, **kwargs: Any):
    return registry("losses").create(name, **kwargs)


def create_dataset(name: str, **kwargs: Any):
    return registry("datasets").create(name, **kwargs)


def get_jacobian_backend(name: str):
    return registry("jacobian_backends").create(name)


def model_pair(teacher: str, student: str) -> ModelPair | None:
    """The registered pairing for ``teacher -> student``, or None when none is registered."""
    reg = registry("model_pairs")
    key = f"{teacher}->{student}"
    return reg.create(key) if key in reg.names() else None
