"""jacplug's built-in plugins, installed under the import name ``jacplug_plugins``.

Each module here is loaded through the ``jacplug`` entry-point group and registers only through the
public hooks of :mod:`jacplug.hookspecs`, exactly as a third-party plugin would.
"""
