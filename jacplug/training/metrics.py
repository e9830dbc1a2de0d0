"""``metrics.jsonl`` (one JSON object per line, per step and per epoch) and the PNG plot of its curves.

Step records: ``{"kind": "step", "step", "epoch", "images", "loss", <term>..., "lr"}``; evaluation
records: ``{"kind": "epoch", "epoch", "step", "images", "train_loss", <term>..., "val_acc", "test_acc",
"time_s"}``; teacher records use ``"kind": "teacher_epoch"``. Lines are appended one write at a time
through :mod:`jacplug.io.files` (a line that cannot be written whole is cut off again; the file is never
followed through a link); a reader skips a torn last line (a run killed mid-write), and ``--resume`` drops
records past the resumed step so no step is counted twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UserError
from ..io.files import WriteFailed, append_text, atomic_write, atomic_write_text, describe

if TYPE_CHECKING:
    from matplotlib.figure import Figure

METRICS = "metrics.jsonl"
PLOT = "curves.png"


def read_metrics(run_dir: str | Path) -> list[dict[str, Any]]:
    """All complete records of ``RUN_DIR/metrics.jsonl`` (empty when the file does not exist).

    A torn last line (a run killed mid-write) is left out; any other line that is not a JSON record
    is a one-line :class:`UserError` naming it, rather than a plot or a resume built on a part of it."""
    from ..errors import UserError

    path = Path(run_dir) / METRICS
    if not path.is_file():
        return []
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{str(path)!r} cannot be read as text ({exc}); it is not a jacplug metrics file") from None
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            records.append(record)
        elif number < len(lines) or record is not None:
            raise UserError(f"{str(path)!r} line {number} is not a JSON record ({line[:40]!r}); the file is corrupt")
    return records


class MetricsLog:
    """Appends records to ``metrics.jsonl``; a no-op off rank 0 (``enabled=False``)."""

    def __init__(self, run_dir: Path, enabled: bool = True) -> None:
        self.path = run_dir / METRICS
        self.enabled = enabled

    def truncate_after(self, step: int, phase: str = "student") -> None:
        """Keep only the records a phase resumed after its ``step`` has already written (used by
        ``--resume``, which runs everything after them again): for the ``"student"`` phase, the teacher's
        records and the student's up to ``step``; for the ``"teacher"`` phase, the teacher's up to ``step``."""
        if not self.enabled or not self.path.is_file():
            return

        def kept_record(record: dict[str, Any]) -> bool:
            if (record.get("kind") == "teacher_epoch") != (phase == "teacher"):
                return phase == "student"  # the student keeps the teacher's records; the teacher none of the student's
            return record.get("step", 0) <= step

        kept = [r for r in read_metrics(self.path.parent) if kept_record(r)]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        append_text(self.path, json.dumps(record) + "\n")

    def start_afresh(self) -> None:
        """Remove the file: an experiment cell that runs again (a retry, a resumed experiment) starts over from
        step 0, so the records of its earlier attempt would otherwise precede a second step 1."""
        if self.enabled:
            self.path.unlink(missing_ok=True)  # a link is removed itself, never what it points at


#: record fields that are positions or settings, not loss values
NOT_LOSSES = {"kind", "epoch", "step", "images", "lr", "time_s"}


def loss_keys(steps: list[dict[str, Any]]) -> list[str]:
    """The loss curves of step records: the weighted total and every term."""
    return sorted({k for r in steps for k in r if k not in NOT_LOSSES})


def check_plottable(steps: list[dict[str, Any]], evaluations: list[dict[str, Any]], path: Path) -> None:
    """A one-line :class:`UserError` unless every step record has a numeric ``step`` and numeric losses, and
    every evaluation record a numeric ``epoch`` and numeric (or null) accuracies: a curve drawn through text
    would be meaningless, and a record without its position cannot be placed."""
    def number(value: Any) -> bool:
        return isinstance(value, (int, float)) and not isinstance(value, bool)

    for rows, position, values in ((steps, "step", lambda r: {k: r[k] for k in r if k not in NOT_LOSSES}),
                                   (evaluations, "epoch", lambda r: {k: r[k] for k in ("val_acc", "test_acc")
                                                                     if r.get(k) is not None})):
        for record in rows:
            if not number(record.get(position)):
                raise UserError(f"{str(path)!r}: a {record.get('kind')!r} record has no numeric {position!r} "
                                f"({json.dumps(record)[:80]}); it was not written by jacplug train")
            bad = {k: v for k, v in values(record).items() if not number(v)}
            if bad:
                key, value = next(iter(bad.items()))
                raise UserError(f"{str(path)!r}: {record.get('kind')} {record[position]} has {key} = {value!r}, "
                                "not a number; it was not written by jacplug train")


def curves_figure(records: list[dict[str, Any]]) -> Figure:
    """The figure of ``curves.png``: one panel per quantity, each on its own axis, so none is read on
    another's scale: the student's loss terms per step (log), its validation and test accuracy (%) per
    epoch, its held-out gradient agreement (cosine, in [-1, 1]) per epoch, and the teacher's validation
    accuracy (%) per *teacher* epoch (its own phase, not the student's). Panels without records are left out.

    Drawn on a :class:`matplotlib.figure.Figure`, never through ``pyplot``: no backend is chosen or changed,
    so a notebook that imports jacplug keeps its own."""
    from matplotlib.figure import Figure  # matplotlib: start-up time, only a plot needs it
    from matplotlib.ticker import MaxNLocator

    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    teacher = [r for r in records if r.get("kind") == "teacher_epoch"]

    def points(rows: list[dict[str, Any]], key: str, scale: float = 1.0) -> list[tuple[float, float]]:
        return [(r["epoch"], scale * r[key]) for r in rows if r.get(key) is not None]

    student_acc = {"student val": points(epochs, "val_acc", 100), "student test": points(epochs, "test_acc", 100)}
    panels = []
    if steps:
        panels.append(("student losses", "student step", "loss (unweighted terms; 'loss' is the weighted total)",
                       {key: [(r["step"], r[key]) for r in steps if key in r] for key in loss_keys(steps)}))
    if any(student_acc.values()):
        panels.append(("student accuracy", "student epoch", "accuracy (%)", student_acc))
    if points(epochs, "agreement_cosine"):
        panels.append(("held-out gradient agreement", "student epoch", "cosine with the teacher's input gradients",
                       {"student vs teacher": points(epochs, "agreement_cosine")}))
    if points(teacher, "val_acc"):
        panels.append(("teacher accuracy", "teacher epoch", "accuracy (%)",
                       {"teacher val": points(teacher, "val_acc", 100)}))
    if not panels:  # a teacher phase without a validation split records no curve
        panels.append(("no curves recorded yet", "teacher epoch", "", {}))
    columns = min(2, len(panels))
    rows = -(-len(panels) // columns)
    figure = Figure(figsize=(5.5 * columns, 4 * rows), dpi=110)
    axes = figure.subplots(rows, columns, squeeze=False).flatten()
    for unused in axes[len(panels):]:
        unused.remove()
    for axis, (title, xlabel, ylabel, curves) in zip(axes, panels):
        for label, xy in curves.items():
            if xy:
                axis.plot(*zip(*xy), label=label, **({"linewidth": 1} if xlabel == "student step" else {"marker": "o"}))
        if xlabel == "student step":
            axis.set_yscale("log")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))  # steps and epochs are counts
        axis.set(title=title, xlabel=xlabel, ylabel=ylabel)
        axis.grid(True, alpha=0.3)
        if axis.lines:
            axis.legend(fontsize=8)
    figure.tight_layout()
    return figure


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw a run's ``metrics.jsonl`` (:func:`curves_figure`) into a PNG, written atomically; returns its path."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    steps = [r for r in records if r.get("kind") == "step"]
    evaluations = [r for r in records if r.get("kind") in ("epoch", "teacher_epoch")]
    if not steps and not any(r.get("kind") == "teacher_epoch" for r in records):
        raise UserError(f"{str(run_dir)!r} has no {METRICS} with training records; is it a jacplug run directory?")
    check_plottable(steps, evaluations, run_dir / METRICS)
    figure = curves_figure(records)
    target = Path(out) if out else run_dir / PLOT
    try:
        atomic_write(target, lambda fh: figure.savefig(fh, format="png"))
    except WriteFailed as exc:
        raise UserError(f"cannot write the plot to {str(target)!r} ({describe(exc.reason)}); choose another --out") from None
    return target
