"""Name registries filled by pluggy plugins loaded from the ``jacplug`` entry-point group.

Why this shape: built-in models, losses, Jacobian backends and datasets register through exactly the
hooks third-party plugins use (``jacplug.hookspecs``), and are found through the same entry-point
group, so the path plugin authors rely on is exercised by every run. Loading is lazy (nothing is
imported until a registry is first read) and each plugin is isolated: one that fails to import,
implements a hook that does not exist, or raises in a hook is reported with its name, distribution
and version and removed, unless ``JACPLUG_STRICT_PLUGINS=1``. ``JACPLUG_PLUGINS=a,b`` limits which
entry points load (an empty value loads none).

Hooks are always called through pluggy, so its contract holds (wrappers, implementations that take
only some of the arguments, ``optionalhook``). Isolation comes from calling each plugin through a
``PluginManager`` of its own: one pluggy hook call per plugin, so a failure belongs to the plugin that
raised and the other plugins still run. A wrapper therefore wraps its own plugin's implementations.
"""

from __future__ import annotations

import difflib
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
    "observers": ("register_observers", "run observer"),
}
LIFECYCLE_HOOKS = ("on_train_start", "on_step_end", "on_epoch_end", "on_checkpoint", "on_image", "on_train_end")


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
        #: name -> (plugin whose registration was replaced, plugin that replaced it with override=True)
        self.overrides: dict[str, tuple[str, str]] = {}

    def add(self, name: str, factory: Callable[..., Any], plugin: str, **metadata: Any) -> None:
        """Register ``name``; a second registration is an error naming both plugins unless the
        later one passes ``override=True``."""
        if not isinstance(name, str) or not name:
            raise TypeError(f"{self.label} names must be non-empty strings, got {name!r} from plugin {plugin!r}")
        if not callable(factory):
            raise TypeError(f"{self.label} {name!r} from plugin {plugin!r}: factory must be callable, got {factory!r}")
        override = bool(metadata.pop("override", False))
        entry = Entry(name, factory, plugin, metadata)
        if not override:
            old = self._entries.get(name)
            if old is not None:
                raise DuplicateNameError(
                    f"{self.label} {name!r} is registered by plugin {old.plugin!r} and again by plugin "
                    f"{plugin!r}; pass override=True in the later register() call to replace it"
                )
            # an exact name shadows the pattern serving it (a timm model name, say): the same conflict
            old = None if entry.is_pattern else self._pattern_serving(name)
            if old is not None:
                raise DuplicateNameError(
                    f"{self.label} {name!r} is served by plugin {old.plugin!r} (pattern {old.name!r}) and "
                    f"registered again by plugin {plugin!r}; pass override=True in the later register() call "
                    "to replace it"
                )
        elif name in self._entries and self._entries[name].plugin != plugin:
            self.overrides[name] = (self._entries[name].plugin, plugin)
        self._entries[name] = entry

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

    def _patterns_matching(self, name: str) -> Iterator[Entry]:
        return (e for e in self._entries.values() if e.is_pattern and fnmatch.fnmatch(name, e.name))

    def _pattern_serving(self, name: str) -> Entry | None:
        """The pattern entry that would build ``name``: it matches and its ``accepts`` (if any) agrees."""
        for candidate in self._patterns_matching(name):
            accepts = candidate.metadata.get("accepts")
            if accepts is None or accepts(name):
                return candidate
        return None

    def get(self, name: str) -> Entry:
        entry = self._entries.get(name) or self._pattern_serving(name)
        if entry is not None:
            return entry
        known = self.names()
        for candidate in self._patterns_matching(name):
            catalog = candidate.metadata.get("catalog")
            if catalog is not None:
                known = known + list(catalog())
        listing = "jacplug models [PATTERN]" if self.kind == "models" else "jacplug plugins"
        hint = f"list them with `{listing}`" if known else "no plugin registered any; see `jacplug plugins`"
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
    #: kind -> name -> the ``description=`` it was registered with (names without one are left out)
    descriptions: dict[str, dict[str, str]] = field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "distribution": self.distribution,
            "version": self.version,
            "module": self.module,
            "hooks": self.hooks,
            "registered": self.registered,
            "descriptions": self.descriptions,
            "error": self.error,
        }


class PluginHost:
    """A pluggy ``PluginManager`` plus the registries its plugins fill.

    ``pm`` holds every loaded plugin (for introspection); hooks are called through a manager per
    plugin (see the module docstring). Tests and embedding applications may create their own host
    (``PluginHost(load_entry_points=False)``) and ``register`` plugin objects in-process; the
    module-level :func:`get_host` serves the CLI.
    """

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = _plugin_manager()
        self.plugins: dict[str, PluginInfo] = {}
        self.failed: dict[str, PluginInfo] = {}
        self._callers: dict[str, pluggy.PluginManager] = {}  # plugin name -> a manager holding only it
        self._load_entry_points = load_entry_points
        self._loaded = False
        self._registries: dict[str, Registry] | None = None

    # -- loading -------------------------------------------------------------------------------
    def _fail(self, info: PluginInfo, stage: str, exc: BaseException) -> None:
        info.error = " ".join(f"{type(exc).__name__}: {exc}".split())  # pluggy's messages span lines
        self.failed[info.name] = info
        origin = f" (distribution {info.distribution} {info.version})" if info.distribution else ""
        message = f"plugin {info.name!r}{origin} failed {stage}: {info.error}"
        if strict_plugins():
            raise PluginError(message) from exc
        warnings.warn(
            message + "; skipped (set JACPLUG_STRICT_PLUGINS=1 to make this fatal)", PluginWarning, stacklevel=3
        )

    def _add(self, plugin: object, name: str | None) -> str:
        """Register ``plugin`` in ``pm`` and in a manager of its own; raise, leaving nothing behind, if
        pluggy refuses it or it implements a hook that does not exist (a misspelling, say)."""
        name = self.pm.register(plugin, name=name)
        if name is None:
            raise ValueError("pluggy refused the plugin (it is blocked)")
        caller = _plugin_manager()
        try:
            caller.register(plugin, name=name)
            caller.check_pending()
        except pluggy.PluginValidationError as exc:
            self.pm.unregister(name=name)
            raise pluggy.PluginValidationError(plugin, _unknown_hooks_message(caller) or str(exc)) from None
        self._callers[name] = caller
        return name

    def _remove(self, name: str) -> None:
        """Forget a plugin everywhere: no registrations, no lifecycle calls."""
        if self.pm.get_plugin(name) is not None:
            self.pm.unregister(name=name)
        self._callers.pop(name, None)
        self.plugins.pop(name, None)
        self._registries = None

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
                self._add(ep.load(), ep.name)
            except Exception as exc:  # any plugin failure must not break the host
                self._fail(info, "to load", exc)
                continue
            info.hooks = self._hooks_of(ep.name)
            self.plugins[ep.name] = info

    def register(self, plugin: object, name: str | None = None) -> str:
        """Register a plugin object (module, class or instance with ``@hookimpl`` methods) in-process.

        Unlike an entry point, a plugin registered here is the caller's own code, so a plugin pluggy
        rejects (an unknown hook, an argument the hook does not have) raises
        ``pluggy.PluginValidationError`` at once instead of being skipped."""
        self.load()
        name = self._add(plugin, name)
        info = PluginInfo(name=name, module=getattr(plugin, "__name__", type(plugin).__name__))
        info.hooks = self._hooks_of(name)
        self.plugins[name] = info
        self._registries = None
        return name

    def unregister(self, name: str) -> None:
        self._remove(name)
        self.failed.pop(name, None)

    def _hooks_of(self, name: str) -> list[str]:
        caller = self._callers[name]
        return sorted(hc.name for hc in caller.get_hookcallers(caller.get_plugin(name)) or [] if hc.has_spec())

    # -- registries ----------------------------------------------------------------------------
    def _collect(self) -> dict[str, Registry]:
        """Call every plugin's registration hooks, in load order (built-ins first), so the first
        registration of a name wins and a later one needs ``override=True``."""
        registries = {kind: Registry(kind) for kind in KINDS}
        for name in list(self.plugins):
            info = self.plugins[name]
            info.registered, info.descriptions = {}, {}
            hooks = self._callers[name].hook
            try:
                for kind, (hook_name, _) in KINDS.items():
                    getattr(hooks, hook_name)(register=_registrar(registries[kind], name, info, kind))
            except Exception as exc:
                for registry in registries.values():
                    registry.remove_plugin(name)
                self._remove(name)
                self._fail(info, "in a registration hook", exc)
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
        """Call a lifecycle hook on every plugin, in pluggy's order (``tryfirst``/``trylast``, else
        the last registered first), isolating failures per plugin."""
        if hook_name not in LIFECYCLE_HOOKS:
            raise ValueError(f"unknown lifecycle hook {hook_name!r}; expected one of {LIFECYCLE_HOOKS}")
        self.load()
        order = dict.fromkeys(impl.plugin_name for impl in reversed(getattr(self.pm.hook, hook_name).get_hookimpls()))
        for name in order:
            try:
                getattr(self._callers[name].hook, hook_name)(**kwargs)
            except Exception as exc:
                self._fail(self.plugins.get(name, PluginInfo(name=name)), f"in {hook_name}", exc)


def _plugin_manager() -> pluggy.PluginManager:
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    return pm


def _unknown_hooks_message(pm: pluggy.PluginManager) -> str:
    """``unknown hook 'register_loss'; did you mean 'register_losses'?`` for each hook ``pm``'s plugins
    implement that no hookspec declares (``optionalhook`` implementations excepted, as pluggy does)."""
    known = [name for name in vars(pm.hook) if not name.startswith("_") and getattr(pm.hook, name).has_spec()]
    parts = []
    for name, caller in vars(pm.hook).items():
        if name.startswith("_") or caller.has_spec() or all(i.optionalhook for i in caller.get_hookimpls()):
            continue
        match = difflib.get_close_matches(name, known, n=1)
        parts.append(f"unknown hook {name!r}" + (f"; did you mean {match[0]!r}?" if match else ""))
    return ", ".join(parts)


def _builtin_first(ep) -> tuple[int, str]:
    dist = getattr(ep, "dist", None)
    return (0 if dist is not None and dist.name == "jacplug" else 1, ep.name)


def _registrar(registry: Registry, plugin: str, info: PluginInfo, kind: str) -> Callable[..., None]:
    def register(name: str, factory: Callable[..., Any], **metadata: Any) -> None:
        registry.add(name, factory, plugin, **metadata)
        info.registered.setdefault(kind, []).append(name)
        if metadata.get("description"):
            info.descriptions.setdefault(kind, {})[name] = str(metadata["description"])

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
