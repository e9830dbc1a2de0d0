"""Folders a command is about to create: refused in one line when a file stands in the way, and removed
again when the command ends without putting anything in them.

Why: a refused command (a misspelt model, an offline download) must leave the file system as it found it;
``mkdir(parents=True)`` would leave ``runs/`` or the missing parents of ``--out``/``--data-root`` behind,
and a file where a folder should be surfaces as ``Not a directory`` or ``File exists`` without saying which
path is the file.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

from ..errors import UserError


def check_folder(path: str | Path, flag: str) -> None:
    """A one-line UserError when ``path`` (given as ``flag``) or a folder above it is a file."""
    path = Path(path)
    for place in (path, *path.parents):
        if place.exists() or place.is_symlink():
            if not place.is_dir():
                where = "is a file" if place == path else f"is under {str(place)!r}, which is a file"
                raise UserError(f"{flag} {str(path)!r} {where}, not a folder; choose another {flag}")
            return


@contextlib.contextmanager
def removed_if_unused(path: str | Path) -> Iterator[None]:
    """Around code that may create ``path``: on leaving, the folders of ``path`` (itself included) that did
    not exist before and hold nothing are removed, deepest first; a folder that holds something stays."""
    path = Path(path).absolute()
    missing = [place for place in (path, *path.parents) if not place.exists()]
    try:
        yield
    finally:
        for folder in missing:
            try:
                folder.rmdir()
            except FileNotFoundError:
                continue  # removed already (the run-directory lock removes the folder it created)
            except OSError:
                break
