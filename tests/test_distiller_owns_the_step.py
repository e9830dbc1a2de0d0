"""The rules of a correct Jacobian step live in one place, :class:`jacplug.Distiller`: no other training code
makes inputs require grad, enters ``double_differentiable`` or calls ``extra_evaluation`` (each copy would be
one more place to get a rule wrong). Read from the code's syntax tree, like tests/test_import_graph.py."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDERS = ("jacplug", "plugins", "benchmarks")

#: module (or package prefix) -> why it may apply a rule itself
ALLOWED = {
    "jacplug/distiller.py": "the step itself",
    "jacplug/engine/": "the engine's own functions: Jacobians of a callable, substitutions",
    "jacplug/losses/": "the loss terms' own evaluations (extra_evaluation is defined there; teacher rows)",
    "jacplug/checks/": "the checks re-run a model on a copy of the batch to name an op",
    "jacplug/training/teacher_cache.py": "the frozen teacher's rows, computed once before training",
    "jacplug/agreement.py": "a measurement of input gradients (one backward, no graph kept), not a training step",
    "jacplug/bench/measure.py": "the bench's hand-written reference steps, measured against the Distiller",
    "benchmarks/double_backward_layers.py": "one layer's double backward, timed alone",
}
RULES = {"double_differentiable", "extra_evaluation"}


def rule_sites(tree: ast.AST) -> list[str]:
    """``line: what`` for each call applying a rule: ``requires_grad_()`` / ``requires_grad_(x)`` other than
    ``requires_grad_(False)``, an assignment ``.requires_grad = True``, a call of ``double_differentiable`` or
    ``extra_evaluation``."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            name = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            freezes = node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value is False
            if name in RULES or (name == "requires_grad_" and not freezes):
                found.append(f"{node.lineno}: {name}")
        elif isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and node.value.value is True:
            if any(isinstance(t, ast.Attribute) and t.attr == "requires_grad" for t in node.targets):
                found.append(f"{node.lineno}: requires_grad = True")
    return sorted(found, key=lambda site: int(site.split(":")[0]))


def test_only_the_distiller_applies_the_step_rules():
    offenders = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            relative = path.relative_to(ROOT).as_posix()
            if any(relative.startswith(prefix) for prefix in ALLOWED):
                continue
            sites = rule_sites(ast.parse(path.read_text()))
            if sites:
                offenders[relative] = sites
    assert offenders == {}


def test_the_walk_sees_each_rule():
    source = "x = x.detach().requires_grad_()\nwith double_differentiable():\n    f = extra_evaluation(m)\n" \
             "y.requires_grad = True\nteacher.requires_grad_(False)\n"
    assert rule_sites(ast.parse(source)) == ["1: requires_grad_", "2: double_differentiable", "3: extra_evaluation",
                                             "4: requires_grad = True"]
