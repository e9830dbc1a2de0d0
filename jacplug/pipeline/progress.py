"""Progress bars (tqdm) that stay quiet when stderr is not a terminal (logs, CI) or off rank 0."""

from __future__ import annotations

import sys
from typing import Iterable, TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")


def want_progress(setting: bool | None, is_main: bool = True) -> bool:
    """``setting`` when given, else only when stderr is a terminal; never off rank 0."""
    if not is_main:
        return False
    return sys.stderr.isatty() if setting is None else bool(setting)


def progress(iterable: Iterable[T], *, desc: str, show: bool, total: int | None = None, leave: bool = False):
    """``tqdm`` over ``iterable``, disabled (a plain pass-through) when ``show`` is false."""
    return tqdm(iterable, desc=desc, total=total, disable=not show, leave=leave, dynamic_ncols=True, file=sys.stderr)
