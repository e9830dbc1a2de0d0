"""Progress output: tqdm bars on a terminal, plain lines in logs and CI, nothing off rank 0.

A training phase reports in optimizer steps and images seen (:class:`PhaseProgress`). With bars (stderr
is a terminal, or ``--progress``) each evaluation round gets a bar; without them (a log file, CI, or
``--no-progress``) one line is printed when the phase starts, then every :data:`LINE_EVERY` steps or
:data:`LINE_SECONDS` seconds, whichever comes first, so a piped or logged run shows it is alive.
Either way every evaluation prints one line with the step, the images seen, the loss and the accuracies.
"""

from __future__ import annotations

import sys
import time
from typing import Any, Iterable, TypeVar

from tqdm.auto import tqdm

from .plan import StepPlan

T = TypeVar("T")

#: steps between progress lines when bars are off
LINE_EVERY = 50
#: the longest silence between progress lines when bars are off (slow steps: large models, a CPU)
LINE_SECONDS = 30.0


def want_progress(setting: bool | None, is_main: bool = True) -> bool:
    """``setting`` when given, else only when stderr is a terminal; never off rank 0."""
    if not is_main:
        return False
    return sys.stderr.isatty() if setting is None else bool(setting)


def progress(iterable: Iterable[T], *, desc: str, show: bool, total: int | None = None, leave: bool = False):
    """``tqdm`` over ``iterable``, disabled (a plain pass-through) when ``show`` is false."""
    return tqdm(iterable, desc=desc, total=total, disable=not show, leave=leave, dynamic_ncols=True, file=sys.stderr)


def _percent(value: Any) -> str:
    return f"{100 * value:.1f}%"


class PhaseProgress:
    """What one phase (``"student resnet18"``, ``"teacher resnet50"``) prints while it trains.

    ``bars``: tqdm bars instead of periodic lines; ``enabled`` false (ranks other than 0) prints nothing.
    """

    def __init__(self, name: str, plan: StepPlan, *, bars: bool, enabled: bool = True, every: int = LINE_EVERY,
                 start: int = 0) -> None:
        self.name, self.plan, self.first = name, plan, start
        self.bars, self.enabled, self.every = bars and enabled, enabled, every
        self.started = self._last_line = time.perf_counter()
        self._bar: Any = None

    def _where(self, step: int) -> str:
        plan = self.plan
        return f"step {step}/{plan.total} (epoch {plan.epoch_of(step)}/{plan.epochs}), {step * plan.batch:,} images"

    def _line(self, text: str) -> None:
        self._last_line = time.perf_counter()
        if self.bars:
            tqdm.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr, flush=True)

    def start(self) -> None:
        """The phase begins: without bars, one line saying how long it runs."""
        if self.enabled and not self.bars:
            where = f"resuming at step {self.first} of {self.plan.total}" if self.first else "starting"
            self._line(f"{self.name}: {where}, {self.plan.describe()}")

    def step(self, step: int, loss: float) -> None:
        """After optimizer step ``step`` (from 1), whose loss was ``loss``."""
        if not self.enabled:
            return
        if self.bars:
            if self._bar is None:  # one bar per evaluation round
                first, end = step - 1, self.plan.next_evaluation(step - 1)
                self._bar = tqdm(desc=f"{self.name} steps {step}-{end}/{self.plan.total}", total=end - first,
                                 leave=False, dynamic_ncols=True, file=sys.stderr)
            self._bar.update(1)
            self._bar.set_postfix(images=f"{step * self.plan.batch:,}", loss=f"{loss:.4g}")
        elif not self.bars and not self.plan.evaluates_at(step) and (
                step % self.every == 0 or time.perf_counter() - self._last_line >= LINE_SECONDS):
            self._line(f"{self.name}: {self._where(step)}, loss {loss:.4g}")

    def evaluated(self, step: int, record: dict[str, Any]) -> None:
        """One line after an evaluation at ``step``: mean loss over the round and the accuracies."""
        if not self.enabled:
            return
        parts = [f"{self.name}: {self._where(step)}"]
        if record.get("train_loss") is not None:
            parts.append(f"loss {record['train_loss']:.4g}")
        parts += [f"{k.split('_')[0]} {_percent(record[k])}" for k in ("val_acc", "test_acc") if record.get(k) is not None]
        parts.append(f"{time.perf_counter() - self.started:.1f} s")
        self.close()
        self._line(", ".join(parts))

    def close(self) -> None:
        """Close the current round's bar, if any."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
