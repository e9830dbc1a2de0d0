"""Built-in plugin: registers the engine's op substitutions (math attention, hard-sigmoid, the
closed-form BatchNorm double backward, and the forward-mode formulations of norms and softmax) through
the public hook, as a third-party plugin would."""

from __future__ import annotations

from jacplug import hookimpl


@hookimpl
def register_op_substitutions(register):
    from jacplug.engine.substitutions import BUILTIN_SUBSTITUTIONS

    for substitution in BUILTIN_SUBSTITUTIONS:
        register(substitution.name, lambda s=substitution: s, description=substitution.reason)
