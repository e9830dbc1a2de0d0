"""A plugin distribution cannot take a built-in's entry-point name, and one that ends the interpreter
(``sys.exit``) at import or in a hook is reported with its name like any other failing plugin."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from jacplug.errors import PluginError
from jacplug.registry import PluginHost, PluginWarning, reset_host
from test_plugins import install_fake_distribution

SHADOW = "from jacplug import hookimpl\n\n@hookimpl\ndef register_losses(register):\n    register('kd', object)\n"
EXITING = "import sys\nsys.exit('plugin gives up')\n"
EXITING_HOOK = "from jacplug import hookimpl\n\n@hookimpl\ndef register_losses(register):\n    raise SystemExit(3)\n"


@pytest.fixture
def site(tmp_path, monkeypatch):
    path = tmp_path / "site"
    path.mkdir()
    monkeypatch.syspath_prepend(str(path))
    monkeypatch.delenv("JACPLUG_STRICT_PLUGINS", raising=False)
    yield path
    for name in [m for m in sys.modules if m.startswith(("shadow_plugin", "exiting_plugin"))]:
        del sys.modules[name]


@pytest.fixture
def host():
    fresh = PluginHost()
    previous = reset_host(fresh)
    yield fresh
    reset_host(previous)


def test_a_distribution_declaring_a_builtin_entry_point_is_refused(site, host, monkeypatch):
    install_fake_distribution(site, "shadow-dist", "6.6", {"shadow_plugin": SHADOW}, {"jacplug.losses": "shadow_plugin"})
    with pytest.warns(PluginWarning, match=r"distribution shadow-dist 6\.6 declares the entry point 'jacplug\.losses', "
                                           r"which is the built-in plugin of distribution jacplug "):
        losses = host.registry("losses")
    assert losses.get("kd").plugin == "jacplug.losses" and "shadow_plugin" not in sys.modules
    assert host.plugins["jacplug.losses"].distribution == "jacplug"
    monkeypatch.setenv("JACPLUG_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match="shadow-dist 6.6 .* jacplug "):
        PluginHost().load()


def test_a_plugin_calling_sys_exit_at_import_or_in_a_hook_is_named(site, host):
    install_fake_distribution(site, "exiting-dist", "1.0", {"exiting_plugin": EXITING}, {"exiting": "exiting_plugin"})
    install_fake_distribution(site, "exiting-hook-dist", "2.0", {"exiting_plugin_hook": EXITING_HOOK},
                              {"exiting-hook": "exiting_plugin_hook"})
    with pytest.warns(PluginWarning) as record:
        assert "kd" in host.registry("losses").names()
    messages = " | ".join(str(w.message) for w in record)
    assert "plugin 'exiting' (distribution exiting-dist 1.0) failed to load: SystemExit: plugin gives up" in messages
    assert "plugin 'exiting-hook' (distribution exiting-hook-dist 2.0) failed in a registration hook: SystemExit: 3" \
        in messages
    env = {**os.environ, "PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-m", "jacplug", "plugins"], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and "exiting  (exiting-dist 1.0) FAILED: SystemExit: plugin gives up" in run.stdout
    assert "jacplug.losses  (jacplug" in run.stdout  # the listing went on past the plugin
