"""One pluggy ``PluginManager`` for every plugin, and the name tables (:mod:`jacplug.names`) its plugins fill.

Built-in models, losses, Jacobian backends and datasets register through exactly the hooks third-party
plugins use (:mod:`jacplug.hookspecs`) and are found through the same ``jacplug`` entry-point group, so the
path plugin authors rely on is exercised by every run. Loading, blocking (``JACPLUG_PLUGINS=a,b`` blocks every
other entry point; an empty value blocks all) and distribution info are pluggy's own. What is added: one
plugin's failure (an import error, a hook that does not exist, an exception in a hook) is reported with its
name, distribution and version and the others go on, unless ``JACPLUG_STRICT_PLUGINS=1`` or the plugin was
registered as essential (a run's checkpoint writer: a run that cannot write its checkpoints must fail, not
finish with files missing that its resume state counts on). For that, hooks are
called one plugin at a time through pluggy's own executor, in pluggy's order (``tryfirst``/``trylast``); a
wrapper therefore wraps its own plugin's implementations.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import os
import warnings
from importlib.metadata import entry_points
from typing import Any, Callable

import pluggy

from . import hookspecs
from .errors import PluginError, UnknownNameError, UserError, close_matches
from .names import KINDS, Entry, ModelPair, NameTable  # noqa: F401  (Entry: re-exported with the tables)

ENTRY_POINT_GROUP = "jacplug"
LIFECYCLE_HOOKS = ("on_train_start", "on_step_end", "on_epoch_end", "on_checkpoint", "on_image", "on_train_end")


class PluginWarning(UserWarning):
    """A plugin was skipped because it failed; the message names it and the error."""


def strict_plugins() -> bool:
    return os.environ.get("JACPLUG_STRICT_PLUGINS", "").strip().lower() in {"1", "true", "yes", "on"}


@dataclasses.dataclass
class PluginInfo:
    """What ``jacplug plugins`` shows for one plugin."""

    name: str
    distribution: str | None = None
    version: str | None = None
    module: str | None = None
    hooks: list[str] = dataclasses.field(default_factory=list)
    registered: dict[str, list[str]] = dataclasses.field(default_factory=dict)
    #: kind -> name -> the ``description=`` it was registered with (names without one are left out)
    descriptions: dict[str, dict[str, str]] = dataclasses.field(default_factory=dict)
    error: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class PluginHost:
    """The ``PluginManager`` (``pm``), what each plugin supplied (``plugins``, ``failed``) and the name tables.

    Tests and embedding applications may create their own host (``PluginHost(load_entry_points=False)``) and
    ``register`` plugin objects in-process; :func:`get_host` serves the CLI.
    """

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT)
        self.pm.add_hookspecs(hookspecs)
        self.plugins: dict[str, PluginInfo] = {}
        self.failed: dict[str, PluginInfo] = {}
        self._load_entry_points = load_entry_points
        self._loaded = False
        self._registries: dict[str, NameTable] | None = None
        #: plugins whose exceptions end the call instead of being reported and skipped
        self.essential: set[str] = set()
        self._dists: dict[str, Any] = {}  # entry-point name -> its importlib.metadata distribution

    def load(self) -> None:
        """Load the entry-point plugins once, built-ins first (so their names are registered first)."""
        if self._loaded:
            return
        self._loaded = True
        if not self._load_entry_points:
            return
        found: dict[str, Any] = {}
        for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=_builtin_first):
            if ep.name in found:
                self._refuse_shadow(ep, found[ep.name])
            else:
                found[ep.name] = ep
        for name in found.keys() - _allowed(found):
            self.pm.set_blocked(name)
        for name, ep in found.items():
            if self.pm.is_blocked(name):
                continue
            try:  # not pluggy's load_setuptools_entrypoints: it loads whichever distribution of a name it meets first
                plugin = ep.load()
                self.pm.register(plugin, name=name)
                self._dists[name] = ep.dist
                _refuse_unknown_hooks(self.pm, plugin)
            except (Exception, SystemExit) as exc:  # one plugin's failure, sys.exit included, must not end the host
                self.pm.set_blocked(name)
                self._fail(PluginInfo(name, ep.dist.name if ep.dist else None, ep.dist.version if ep.dist else None,
                                      ep.value), "to load", exc)
                continue
            self.plugins[name] = self._info(name)

    def _refuse_shadow(self, ep: Any, kept: Any) -> None:
        """A second entry point of a name already taken (a built-in's, say) would replace it silently: refuse
        it, keep the first (built-ins sort first), and name both distributions."""
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist else ep.value
        owner = f"{kept.dist.name} {kept.dist.version}" if kept.dist else kept.value
        what = "the built-in plugin" if _builtin_first(kept)[0] == 0 else "the plugin"
        info = PluginInfo(ep.name, ep.dist.name if ep.dist else None, ep.dist.version if ep.dist else None, ep.value)
        info.error = (f"distribution {dist} declares the entry point {ep.name!r}, which is {what} of distribution "
                      f"{owner}; refused, the one of {owner} is kept (give the plugin an entry-point name of its own)")
        self.failed[f"{ep.name} ({dist})"] = info
        self._report(f"plugin {ep.name!r}: {info.error}")

    def register(self, plugin: object, name: str | None = None, *, essential: bool = False) -> str:
        """Register a plugin object (module, class or instance with ``@hookimpl`` methods) in-process.

        Unlike an entry point, a plugin registered here is the caller's own code, so a plugin pluggy rejects
        (an unknown hook, an argument the hook does not have) raises ``pluggy.PluginValidationError`` at once.
        Cheap for a run's observers: names already collected stay, only this plugin's registrations are added.
        An ``essential`` plugin is not isolated: an exception in its hooks propagates to the caller of
        :meth:`notify`.
        """
        self.load()
        name = self.pm.register(plugin, name=name)
        if name is None:
            raise ValueError(f"plugin {plugin!r} is blocked (JACPLUG_PLUGINS, or it failed to load)")
        try:
            _refuse_unknown_hooks(self.pm, plugin)
        except pluggy.PluginValidationError:
            self.pm.unregister(name=name)
            raise
        self.plugins[name] = self._info(name)
        if essential:
            self.essential.add(name)
        if self._registries is not None:
            self._collect_from(name, self._registries)
        return name

    def unregister(self, name: str) -> None:
        """Forget a plugin: no registrations, no hook calls. The names it registered (and any it overrode)
        are collected again on the next read; a plugin that registered none costs nothing."""
        self.pm.unregister(name=name)
        self.essential.discard(name)
        info = self.plugins.pop(name, None)
        if self.failed.pop(name, None) is not None:
            self.pm.unblock(name)
        if info is not None and info.registered:
            self._registries = None

    def registry(self, kind: str) -> NameTable:
        if kind not in KINDS:
            raise UnknownNameError("registry kind", kind, KINDS)
        self.load()
        if self._registries is None:
            self._registries = {k: NameTable(k) for k in KINDS}
            for name in list(self.plugins):  # load order: the first registration of a name wins
                self._collect_from(name, self._registries)
        return self._registries[kind]

    def notify(self, hook_name: str, /, **kwargs: Any) -> None:
        """Call a lifecycle hook on every plugin, isolating failures per plugin."""
        if hook_name not in LIFECYCLE_HOOKS:
            raise ValueError(f"unknown lifecycle hook {hook_name!r}; expected one of {LIFECYCLE_HOOKS}")
        self.each(hook_name, **kwargs)

    def each(self, hook_name: str, /, **kwargs: Any) -> None:
        """Call ``hook_name`` on each plugin in pluggy's order (``tryfirst`` first, then the last registered),
        one plugin at a time, so a plugin that raises is reported and the others still run; an essential
        plugin's exception propagates, and the plugins after it are not called."""
        self.load()
        impls = getattr(self.pm.hook, hook_name).get_hookimpls()
        for name in dict.fromkeys(impl.plugin_name for impl in reversed(impls)):
            try:
                self._call(hook_name, name, **kwargs)
            except (Exception, SystemExit) as exc:
                if name in self.essential:
                    raise
                self._fail(self.plugins.get(name) or PluginInfo(name), f"in {hook_name}", exc)

    def _call(self, hook_name: str, plugin: str, /, **kwargs: Any) -> None:
        """Run one plugin's implementations of ``hook_name`` through pluggy's executor (wrappers and partial
        signatures included). Not ``subset_hook_caller``: it keeps the other plugins in a set, and a run's
        observers may be unhashable (a dataclass instance, say)."""
        caller = getattr(self.pm.hook, hook_name)
        impls = [impl for impl in caller.get_hookimpls() if impl.plugin_name == plugin]
        if impls:
            self.pm._hookexec(hook_name, impls, kwargs, bool(caller.spec and caller.spec.opts.get("firstresult")))

    def _collect_from(self, name: str, registries: dict[str, NameTable]) -> None:
        """Call one plugin's registration hooks; if one raises, the plugin and all it registered go."""
        info = self.plugins[name]
        info.registered, info.descriptions = {}, {}
        try:
            for kind, (hook_name, _) in KINDS.items():
                self._call(hook_name, name, register=_registrar(registries[kind], info, kind))
        except (Exception, SystemExit) as exc:
            for table in registries.values():
                table.remove_plugin(name)
            self.pm.unregister(name=name)
            del self.plugins[name]
            self._fail(info, "in a registration hook", exc)

    def _info(self, name: str) -> PluginInfo:
        plugin = self.pm.get_plugin(name)
        dist = self._dists.get(name)
        hooks = sorted(caller.name for caller in self.pm.get_hookcallers(plugin) or [] if caller.has_spec())
        return PluginInfo(name, dist.metadata["Name"] if dist else None, dist.version if dist else None,
                          getattr(plugin, "__name__", type(plugin).__name__), hooks)

    def _fail(self, info: PluginInfo, stage: str, exc: BaseException) -> None:
        info.error = " ".join(f"{type(exc).__name__}: {exc}".split())  # pluggy's messages span lines
        self.failed[info.name] = info
        origin = f" (distribution {info.distribution} {info.version})" if info.distribution else ""
        self._report(f"plugin {info.name!r}{origin} failed {stage}: {info.error}", exc)

    @staticmethod
    def _report(message: str, exc: BaseException | None = None) -> None:
        """Warn and go on, or raise in strict mode (``JACPLUG_STRICT_PLUGINS=1``)."""
        if strict_plugins():
            raise PluginError(message) from exc
        warnings.warn(message + "; skipped (set JACPLUG_STRICT_PLUGINS=1 to make this fatal)", PluginWarning,
                      stacklevel=4)


def _allowed(found: dict) -> set[str]:
    """The entry points ``JACPLUG_PLUGINS`` lets load (all when unset); a name it lists that no entry point has
    is an error, since a typo there would otherwise leave every name unknown."""
    value = os.environ.get("JACPLUG_PLUGINS")
    if value is None:
        return set(found)
    wanted = {name.strip() for name in value.split(",") if name.strip()}
    unknown = sorted(wanted - found.keys())
    if unknown:
        raise PluginError(f"JACPLUG_PLUGINS names {', '.join(map(repr, unknown))}, which no installed plugin provides; "
                          f"the entry points of group {ENTRY_POINT_GROUP!r} are: {', '.join(sorted(found)) or 'none'}")
    return wanted


def _refuse_unknown_hooks(pm: pluggy.PluginManager, plugin: object) -> None:
    """pluggy's ``check_pending`` for one plugin, naming the close match: ``unknown hook 'register_loss'; did you
    mean 'register_losses'?`` (``optionalhook`` implementations excepted, as pluggy does)."""
    known = [name for name, caller in vars(pm.hook).items() if caller.has_spec()]
    problems = [
        f"unknown hook {caller.name!r}" + "".join(f"; did you mean {m!r}?" for m in difflib.get_close_matches(caller.name, known, 1))
        for caller in pm.get_hookcallers(plugin) or []
        if not caller.has_spec() and not all(impl.optionalhook for impl in caller.get_hookimpls())
    ]
    if problems:
        raise pluggy.PluginValidationError(plugin, ", ".join(problems))


def _builtin_first(ep) -> tuple[int, str]:
    return (0 if ep.dist is not None and ep.dist.name == "jacplug" else 1, ep.name)


def _registrar(table: NameTable, info: PluginInfo, kind: str) -> Callable[..., None]:
    def register(name: str, factory: Callable[..., Any], **metadata: Any) -> None:
        table.add(name, factory, info.name, **metadata)
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


def registry(kind: str) -> NameTable:
    return get_host().registry(kind)


def create_model(name: str, **kwargs: Any):
    """Build a registered model (any timm name through the built-in timm plugin)."""
    return registry("models").create(name, **kwargs)


def create_loss(name: str, **kwargs: Any):
    """Build a registered loss term; an option its factory does not take is one line naming the closest
    one it does (``clases=`` -> ``classes``) and all it takes."""
    table = registry("losses")
    check_options(f"loss {name!r}", table.get(name), kwargs)
    return table.create(name, **kwargs)


def check_options(what: str, entry: Entry, options: dict[str, Any]) -> None:
    """Refuse, in one :class:`UserError` line, ``options`` that ``entry``'s factory cannot take: an unknown
    keyword with its closest match, or what binding them reports (a missing required option), with the
    options the factory takes. Python's own ``TypeError`` would name the factory's class, not the
    registered name, and suggest nothing."""
    try:
        signature = inspect.signature(entry.factory)
    except (TypeError, ValueError):  # no signature to read: the factory reports a bad option itself
        return
    named = [p.name for p in signature.parameters.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    takes = named[1:] if entry.is_pattern else named  # a pattern's factory gets the requested name first
    try:
        signature.bind(*(["name"] if entry.is_pattern else []), **options)
    except TypeError as exc:
        unknown = [key for key in options if key not in takes]
        accepted = ", ".join(takes) or "none"
        if unknown:
            matches = close_matches(unknown[0], takes, n=1)
            hint = f" (did you mean {matches[0]!r}?)" if matches else ""
            raise UserError(f"{what} has no option {unknown[0]!r}{hint}; it takes: {accepted}") from None
        raise UserError(f"{what}: {exc}; it takes: {accepted}") from None


def create_dataset(name: str, **kwargs: Any):
    return registry("datasets").create(name, **kwargs)


def get_jacobian_backend(name: str):
    return registry("jacobian_backends").create(name)


def model_pair(teacher: str, student: str) -> ModelPair | None:
    """The registered pairing for ``teacher -> student``, or None when none is registered."""
    pairs = registry("model_pairs")
    key = f"{teacher}->{student}"
    return pairs.create(key) if key in pairs.names() else None
