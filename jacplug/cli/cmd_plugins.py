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
    if args.json:
        print(json.dumps({"plugins": loaded, "failed": failed}, indent=2))
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
                print(f"    {name:<{width}}  {described.get(name, '')}".rstrip())
    for info in failed:
        origin = f"{info['distribution']} {info['version']}" if info["distribution"] else "in-process"
        print(f"{info['name']}  ({origin}) FAILED: {info['error']}")
    if not loaded and not failed:
        print("no plugins loaded (is JACPLUG_PLUGINS set to an empty list?)")
    return 0
