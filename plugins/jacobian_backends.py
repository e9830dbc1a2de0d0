"""Built-in plugin: registers the engine's Jacobian backends (``jacplug.engine.BUILTIN_BACKENDS``) by name
through the public hook, as a third-party backend would."""

from __future__ import annotations

from jacplug import hookimpl


@hookimpl
def register_jacobian_backends(register):
    from jacplug.engine import BUILTIN_BACKENDS

    for backend in BUILTIN_BACKENDS:
        register(
            backend.name,
            backend,
            description=backend.description,
            requires_callable=backend.requires_callable,
        )
