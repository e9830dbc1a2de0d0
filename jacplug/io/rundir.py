"""What a run directory already holds, so that a run starts only in one that is new or empty, or continues
(``--resume``) the run it holds: a new run writing over an interrupted one's files would mix two runs (a
trained teacher replaced, ``metrics.jsonl`` appended to, checkpoints of another configuration) without a
word. ``jacplug train`` and ``jacplug experiment`` ask before anything is written (docs/pipeline.md,
"The run directory")."""

from __future__ import annotations

from pathlib import Path

#: entries named in a refusal; more are counted
SHOWN = 6


def leftovers(directory: str | Path) -> list[str]:
    """The entries of ``directory`` (sorted, a folder with a trailing ``/``), none when it does not exist.
    Hidden entries are not counted: the run lock and the temporary files of an interrupted write, which the
    run holding the lock removes."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p.name + ("/" if p.is_dir() else "") for p in directory.iterdir() if not p.name.startswith("."))


def describe(names: list[str]) -> str:
    """``"a, b, c"``, or the first :data:`SHOWN` names and how many more."""
    more = f" and {len(names) - SHOWN} more" if len(names) > SHOWN else ""
    return ", ".join(names[:SHOWN]) + more
