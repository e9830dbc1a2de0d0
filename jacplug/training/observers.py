"""The observers of a run and the events they receive.

What a run does besides stepping (the metrics file, progress, checkpoints, the curves plot, trackers) is
an observer: an object with lifecycle ``@hookimpl`` methods, built by a factory that a plugin registered
through ``register_observers`` (the built-in ones in ``jacplug_plugins.observers``, exactly as a third
party registers). :func:`observing` builds the observers a configuration asks for (the defaults, less
``--log-off NAME``, plus ``--log NAME[:KEY=VALUE,...]``), registers them on the plugin host for the run, and
removes them afterwards; module-level plugins that implement lifecycle hooks receive the events too.

An observer registered as ``essential`` (the checkpoint writer) is not isolated: its exception (a checkpoint
that cannot be written) ends the run, so the run never reports files it does not have and its resume state
never counts on them. The others are optional: their exceptions are warnings naming the plugin.
"""

from __future__ import annotations

import contextlib
import itertools
from typing import Any, Iterator, Sequence

from ..errors import UserError
from ..registry import PluginHost, get_host
from ..specs import OBSERVER_FORM, parse_named

_RUN_IDS = itertools.count()


def parse_observer(spec: str) -> tuple[str, dict[str, Any]]:
    """``"NAME[:KEY=VALUE,...]"`` -> ``(name, options)``, read as every spec is (:mod:`jacplug.specs`)."""
    return parse_named(spec, "--log", OBSERVER_FORM)


def check_observers(log: Sequence[str], log_off: Sequence[str], host: PluginHost | None = None) -> None:
    """Refuse, in one line and before any work, an unknown observer name (with close matches) or an
    essential observer switched off."""
    registry = (host or get_host()).registry("observers")
    for spec in log:
        registry.get(parse_observer(spec)[0])
    for name in log_off:
        entry = registry.get(name)
        if entry.metadata.get("essential"):
            raise UserError(f"--log-off {name}: the {name!r} observer is essential to a run and cannot be switched off")


@contextlib.contextmanager
def observing(log: Sequence[str] = (), log_off: Sequence[str] = (), *, enabled: bool = True,
              host: PluginHost | None = None) -> Iterator[list[str]]:
    """Build and register the observers for one run (none when ``enabled`` is false, off rank 0); yields
    their names on the host. They are unregistered on exit, however the run ends."""
    host = host or get_host()
    registered: list[str] = []
    if not enabled:
        yield registered
        return
    check_observers(log, log_off, host)
    registry = host.registry("observers")
    wanted = {entry.name: {} for entry in registry if entry.metadata.get("default") and entry.name not in log_off}
    wanted.update(dict(parse_observer(spec) for spec in log))
    run_id = next(_RUN_IDS)
    try:
        for name, options in wanted.items():
            try:
                observer = registry.create(name, **options)
            except TypeError as exc:
                raise UserError(f"--log {name}: {exc}") from None
            essential = bool(registry.get(name).metadata.get("essential"))
            registered.append(host.register(observer, name=f"{name}-observer-{run_id}", essential=essential))
        yield registered
    finally:
        for name in registered:
            host.unregister(name)
