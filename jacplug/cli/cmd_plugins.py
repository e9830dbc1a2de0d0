"""``jacplug plugins``: what is loaded, from which distribution, which hooks, which names."""

from __future__ import annotations

import argparse
import json

from ..registry import KINDS, get_host


def add_parser(sub) -> None:
    p = sub.add_parser("plugins", help="list loaded plugins, their hooks and the names they register")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    host = get_host()
    for kind in KINDS:  # collects registrations, reporting broken plugins
        host.registry(kind)
    loaded = [info.as_dict() for info in host.plugins.values()]
    failed = [info.as_dict() for info in host.failed.values()]
    overrides = {kind: host.registry(kind).overrides for kind in KINDS}
    if args.json:
        replaced = {kind: {name: {"replaced": old, "by": new} for name, (old, new) in found.items()}
                    for kind, found in overrides.items() if found}
        print(json.dumps({"plugins": loaded, "failed": failed, "overrides": replaced}, indent=2))
        return 0
    for info in loaded:
        origin = f"{info['distribution']} {info['version']}" if info["distribution"] else "registered in-process"
        print(f"{info['name']}  ({origin}; module {info['module']})")
        print(f"  hooks: {', '.join(info['hooks']) or '-'}")
        for kind, names in sorted(info["registered"].items()):
            print(f"  {kind}:")
            described = info["descriptions"].get(kind, {})
            width = max(map(len, names))
            for name in names:
                print(f"    {name:<{width}}  {described.get(name, '')}{_override_note(overrides, kind, name, info['name'])}"
                      .rstrip())
    for info in failed:
        origin = f"{info['distribution']} {info['version']}" if info["distribution"] else "in-process"
        print(f"{info['name']}  ({origin}) FAILED: {info['error']}")
    if not loaded and not failed:
        print("no plugins loaded (is JACPLUG_PLUGINS set to an empty list?)")
    return 0


def _override_note(overrides: dict, kind: str, name: str, plugin: str) -> str:
    """`` (overridden by plugin 'x': not in use)`` or `` (overrides plugin 'y')``, or nothing."""
    old, new = overrides.get(kind, {}).get(name, (None, None))
    if plugin == old:
        return f"  (overridden by plugin {new!r}: not in use)"
    if plugin == new:
        return f"  (overrides plugin {old!r})"
    return ""
