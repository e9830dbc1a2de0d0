"""jacplug's built-in plugins, installed under the import name ``jacplug_plugins``.

Each module here is one entry point of the ``jacplug`` group (pyproject.toml) and registers only through
the public hooks of :mod:`jacplug.hookspecs`, exactly as a third-party plugin would. Integrations with other
frameworks' registries (torchdistill) live in :mod:`jacplug.integrations`, not here.
"""
