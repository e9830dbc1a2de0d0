"""The house's floors: no library module imports the command line, and no two modules import each other
(directly or round a longer circle) at import time. Imports inside functions (deferred on purpose, to keep
``import jacplug`` cheap) and under ``if TYPE_CHECKING:`` are not import-time edges."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"jacplug": ROOT / "jacplug", "jacplug_plugins": ROOT / "plugins"}


def modules() -> dict[str, Path]:
    found = {}
    for package, folder in PACKAGES.items():
        for path in folder.rglob("*.py"):
            parts = path.relative_to(folder).with_suffix("").parts
            name = ".".join((package, *parts[:-1])) if parts[-1] == "__init__" else ".".join((package, *parts))
            found[name] = path
    return found


def resolve(module: str, is_package: bool, node: ast.ImportFrom) -> str:
    if not node.level:
        return node.module or ""
    base = module.split(".") if is_package else module.split(".")[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def edges(known: dict[str, Path], *, top_level_only: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for name, path in known.items():
        tree = ast.parse(path.read_text())
        is_package = path.name == "__init__.py"
        body = tree.body if top_level_only else list(ast.walk(tree))
        targets: set[str] = set()
        for node in body:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                continue
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom):
                source = resolve(name, is_package, node)
                targets.add(source)
                targets.update(f"{source}.{alias.name}" for alias in node.names)
        graph[name] = {t for t in targets if t in known and t != name}
    return graph


def test_no_library_module_imports_the_command_line():
    known = modules()
    graph = edges(known, top_level_only=False)
    offenders = {name: sorted(t for t in targets if t.startswith("jacplug.cli"))
                 for name, targets in graph.items() if not name.startswith(("jacplug.cli", "jacplug.__main__"))}
    assert {k: v for k, v in offenders.items() if v} == {}


def test_no_import_time_circle():
    known = modules()
    graph = edges(known, top_level_only=True)
    for name in graph:  # a package imports its own submodules by design; that is not a circle back
        graph[name] = {t for t in graph[name] if not name.startswith(t + ".")}
    seen, stack, cycles = set(), [], []

    def visit(node: str) -> None:
        if node in stack:
            cycles.append(stack[stack.index(node):] + [node])
            return
        if node in seen:
            return
        seen.add(node)
        stack.append(node)
        for target in sorted(graph.get(node, ())):
            visit(target)
        stack.pop()

    for name in sorted(graph):
        visit(name)
    assert cycles == []


# The floors of the house, bottom first. A module imports only from its own floor or the floors below it,
# at import time or inside a function alike, so a newcomer can read the package from the bottom up.
FLOORS = [
    # files, names and values: nothing about models or training
    ("jacplug._version", "jacplug._lazy", "jacplug.errors", "jacplug.specs", "jacplug.config_fields",
     "jacplug.hookspecs", "jacplug.names", "jacplug.outputs", "jacplug.precision", "jacplug.io"),
    # the library a user's own loop imports: engine, taps, losses, checks; the plugin host; datasets
    ("jacplug.engine", "jacplug.features", "jacplug.losses", "jacplug.checks", "jacplug.registry",
     "jacplug.events", "jacplug.capture", "jacplug.ddp", "jacplug.frozen_teacher", "jacplug.data"),
    # the step every caller runs, the models of a run, what the student learned
    ("jacplug.distiller", "jacplug.models", "jacplug.agreement"),
    # the frameworks' thin layers over the step; the run loop, its phases and observers
    ("jacplug.integrations", "jacplug.training"),
    # the commands' set-up, the benchmark, the built-in plugins
    ("jacplug.commands", "jacplug.experiment", "jacplug.bench", "jacplug_plugins"),
    # the command line and the package's front door
    ("jacplug.cli", "jacplug.__main__"),
]


def floor_of(module: str) -> int:
    if module == "jacplug":  # the front door imports only the bottom floor; the rest of its names are lazy
        return 0
    best = None
    for index, floor in enumerate(FLOORS):
        for prefix in floor:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > len(best[1]):
                    best = (index, prefix)
    assert best is not None, f"{module} is on no floor: add it to FLOORS"
    return best[0]


def test_every_module_sits_on_a_floor():
    for name in modules():
        floor_of(name)


def test_no_import_runs_back_up():
    known = modules()
    graph = edges(known, top_level_only=False)
    upward = {name: sorted(t for t in targets if floor_of(t) > floor_of(name))
              for name, targets in graph.items()}
    assert {k: v for k, v in upward.items() if v} == {}
