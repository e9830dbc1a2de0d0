"""Name tables: what each registered name (a model, a loss term, a dataset, ...) builds, and which plugin
supplied it.

Why apart from :mod:`jacplug.registry`: these tables are plain data with the registration rules (a name
registered twice needs ``override=True``, an unknown name is answered with its close matches); loading
plugins and calling their hooks is pluggy's job, in the registry module.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from .errors import DuplicateNameError, UnknownNameError

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


class NameTable:
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
