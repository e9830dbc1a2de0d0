"""``metrics.jsonl`` (one JSON object per line, per step and per epoch) and the PNG plot of its curves.

Step records: ``{"kind": "step", "step", "epoch", "images", "loss", <term>..., "lr"}``; evaluation
records: ``{"kind": "epoch", "epoch", "step", "images", "train_loss", <term>..., "val_acc", "test_acc",
"time_s"}``; teacher records use ``"kind": "teacher_epoch"``. Lines are appended and flushed one at
a time; a reader skips a torn last line (a run killed mid-write), and ``--resume`` drops records past the
resumed step so no step is counted twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..io.checkpoint import atomic_write, atomic_write_text

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
        with open(self.path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()


#: record fields that are positions or settings, not loss values
NOT_LOSSES = {"kind", "epoch", "step", "images", "lr", "time_s"}


def loss_keys(steps: list[dict[str, Any]]) -> list[str]:
    """The loss curves of step records: the weighted total and every term."""
    return sorted({k for r in steps for k in r if k not in NOT_LOSSES})


def check_plottable(steps: list[dict[str, Any]], evaluations: list[dict[str, Any]], path: Path) -> None:
    """A one-line :class:`UserError` unless every step record has a numeric ``step`` and numeric losses, and
    every evaluation record a numeric ``epoch`` and numeric (or null) accuracies: a curve drawn through text
    would be meaningless, and a record without its position cannot be placed."""
    from ..errors import UserError

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


def plot_curves(run_dir: str | Path, out: str | Path | None = None) -> Path:
    """Draw the per-step loss terms and the per-epoch accuracies of a run into a PNG; returns its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..errors import UserError

    run_dir = Path(run_dir)
    records = read_metrics(run_dir)
    steps = [r for r in records if r.get("kind") == "step"]
    epochs = [r for r in records if r.get("kind") == "epoch"]
    teacher = [r for r in records if r.get("kind") == "teacher_epoch"]
    if not steps and not teacher:
        raise UserError(f"{str(run_dir)!r} has no {METRICS} with training records; is it a jacplug run directory?")
    check_plottable(steps, epochs + teacher, run_dir / METRICS)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    if steps:
        keys = loss_keys(steps)
        for key in keys:
            xs = [r["step"] for r in steps if key in r]
            ax_loss.plot(xs, [r[key] for r in steps if key in r], label=key, linewidth=1)
        ax_loss.set_yscale("log")
    ax_loss.set(xlabel="step", ylabel="loss (unweighted terms; 'loss' is the weighted total)", title="student losses")
    ax_loss.legend(fontsize=8)
    for label, rows, key in (
        ("teacher val", teacher, "val_acc"),
        ("student val", epochs, "val_acc"),
        ("student test", epochs, "test_acc"),
        ("student-teacher gradient agreement (held-out cosine)", epochs, "agreement_cosine"),
    ):
        points = [(r["epoch"], r[key]) for r in rows if r.get(key) is not None]
        if points:
            ax_acc.plot(*zip(*points), marker="o", label=label)
    ax_acc.set(xlabel="epoch", ylabel="accuracy, agreement", title="accuracy and held-out gradient agreement")
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    target = Path(out) if out else run_dir / PLOT
    try:
        atomic_write(target, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    except OSError as exc:
        raise UserError(f"cannot write the plot to {str(target)!r} ({exc.strerror or exc}); choose another --out") from None
    finally:
        plt.close(fig)
    return target
