"""Every ```python block in README.md and docs/*.md runs, in order, in one namespace per file.

A block opts out only with a visible marker on its fence: ```python no-run (use sparingly, e.g. for
a snippet that needs a GPU or the network). Other fences (```bash, ```text) are not Python and are
skipped. A failing block is reported by file and line.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
ALL_DOCS = sorted([*ROOT.glob("docs/*.md"), *ROOT.glob("README.md")])
FENCE = re.compile(r"^(?P<indent> {0,3})```(?P<info>[^\n`]*)\n(?P<body>.*?)^(?P=indent)```[ \t]*$", re.S | re.M)


def python_blocks(text: str) -> list[tuple[int, str]]:
    """``(line number, source)`` of each runnable ```python block, in document order."""
    blocks = []
    for match in FENCE.finditer(text):
        words = match["info"].split()
        if not words or words[0] not in ("python", "py") or "no-run" in words[1:]:
            continue
        line = text.count("\n", 0, match.start("body")) + 1
        blocks.append((line, match["body"]))
    return blocks


def test_fence_parser():
    text = "intro\n```python\na = 1\n```\n```bash\nexit 1\n```\n```python no-run\nraise SystemExit\n```\n```py\nb = a\n```\n"
    assert python_blocks(text) == [(3, "a = 1\n"), (12, "b = a\n")]


#: pages with runnable snippets (pages of prose, tables and shell commands only have nothing to run)
DOCS = [p for p in ALL_DOCS if python_blocks(p.read_text(encoding="utf-8"))]


def test_the_library_pages_have_runnable_snippets():
    names = {p.name for p in DOCS}
    assert {"README.md", "autograd-explained.md", "reuse.md", "jacobian.md", "plugins.md"} <= names


#: modules a page may need that a supported environment can lack: the optional integrations' frameworks
#: (their pip extras) and PyTorch APIs newer than the oldest supported torch; missing, the page is skipped
OPTIONAL_MODULES = ("transformers", "lightning", "torch.nn.attention")


@pytest.mark.parametrize("path", DOCS, ids=[p.relative_to(ROOT).as_posix() for p in DOCS])
def test_doc_snippets_run(path: Path, tmp_path, monkeypatch):
    blocks = python_blocks(path.read_text(encoding="utf-8"))
    monkeypatch.chdir(tmp_path)  # snippets that write files write them here
    torch.manual_seed(0)
    namespace: dict = {"__name__": f"docs_{path.stem}"}
    for line, source in blocks:
        # pad with newlines so tracebacks show the line number in the .md file
        code = compile("\n" * (line - 1) + source, str(path), "exec")
        try:
            exec(code, namespace)
        except ModuleNotFoundError as exc:
            if exc.name not in OPTIONAL_MODULES:
                raise
            pytest.skip(f"{path.name} line {line} needs {exc.name}, which this environment lacks")
