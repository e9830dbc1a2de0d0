"""An experiment's progress on disk, so that an interrupted one resumes: ``OUT/experiment.json`` (what
it computes), ``OUT/cells/<cell id>.json`` (one finished cell's record, written atomically the moment
the cell finishes), ``OUT/cells/teacher.json`` (the teacher's record) beside ``OUT/teacher.safetensors``,
and ``OUT/results.json``, written last, which marks the experiment finished.

``--resume`` (or ``--resume auto``) runs only the cells without a record and reuses the teacher; the
records read back are exactly what the finished cells returned (JSON keeps floats exactly), so the
resumed ``results.json`` equals an uninterrupted run's except for the phases' wall-clock times
(``selection_time_s``, ``main_time_s``, ``wall_time_s``), which count the resuming process only.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from ..errors import UserError
from ..io.files import atomic_write_text, remove_stale_temp_files
from ..io.rundir import describe, leftovers
from .config import ExperimentConfig, RunSpec
from .report import RESULTS_JSON

EXPERIMENT_FILE = "experiment.json"
CELLS_DIR = "cells"
TEACHER_RECORD = "teacher"

#: options that say how and where the cells run, not what they compute: a resume may change them
EXECUTION = ("device", "devices", "workers", "threads", "loader_workers", "eval_batch_size", "out", "resume",
             "executor", "ray_address", "retries")


def spec_of(record: dict[str, Any]) -> RunSpec:
    """The :class:`RunSpec` a cell's record came from."""
    return RunSpec(record["method"], record["samples_per_class"], record["seed"],
                   tuple(record["weights"].items()), record["phase"])


def identity(config: ExperimentConfig) -> dict[str, Any]:
    """What the experiment computes: every option but :data:`EXECUTION`, as JSON would store it."""
    options = {k: v for k, v in dataclasses.asdict(config).items() if k not in EXECUTION}
    return json.loads(json.dumps(options))


class Records:
    """The records of one experiment directory (see the module's docstring)."""

    def __init__(self, out: str | Path) -> None:
        self.out = Path(out)
        self.cells = self.out / CELLS_DIR

    def state(self, config: ExperimentConfig) -> str:
        """``"new"``, ``"resume"`` or ``"finished"``, by what ``out`` holds and ``config.resume``; a
        one-line :class:`UserError` when they do not go together."""
        mode = config.resume
        flag = "--resume auto" if mode == "auto" else "--resume"
        if (self.out / RESULTS_JSON).exists():
            if mode:
                return "finished"
            raise UserError(f"{str(self.out)!r} already holds an experiment's results ({RESULTS_JSON}); choose "
                            "another --out, or move the old results away to run it again")
        saved = self.out / EXPERIMENT_FILE
        if not saved.is_file():
            if mode is True:
                raise UserError(f"--resume: {str(self.out)!r} holds no experiment (no {EXPERIMENT_FILE}); pass its "
                                "directory as --out, or --resume auto to start it when there is none")
            found = leftovers(self.out)
            if found:  # another command's run, or anything else: a new experiment would write over it
                raise UserError(f"{str(self.out)!r} is not empty ({describe(found)}) and holds no experiment to "
                                f"resume (no {EXPERIMENT_FILE}); choose another --out")
            return "new"
        if not mode:
            raise UserError(f"{str(self.out)!r} holds an interrupted experiment ({len(self.finished())} finished "
                            "cells); pass --resume (or --resume auto) to continue it, or choose another --out")
        try:
            recorded = json.loads(saved.read_text())
        except json.JSONDecodeError as exc:
            raise UserError(f"{str(saved)!r} is corrupt ({exc}); the experiment cannot be resumed") from exc
        ours = identity(config)
        changed = [f"--{k.replace('_', '-')} {ours.get(k)!r} (saved: {recorded.get(k)!r})"
                   for k in sorted(set(ours) | set(recorded)) if ours.get(k) != recorded.get(k)]
        if changed:
            raise UserError(f"{flag}: {str(self.out)!r} holds an experiment of another configuration: "
                            f"{'; '.join(changed)}; give the same options, or choose another --out")
        return "resume"

    def start(self, config: ExperimentConfig) -> None:
        """Record what a new experiment computes, before its teacher is trained."""
        self.out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.out / EXPERIMENT_FILE, json.dumps(identity(config), indent=2, sort_keys=True))

    def finished(self) -> dict[str, dict[str, Any]]:
        """Every finished cell's record, by cell id (the teacher's under :data:`TEACHER_RECORD`)."""
        if not self.cells.is_dir():
            return {}
        remove_stale_temp_files(self.cells)  # a record whose write a kill interrupted: its cell runs again
        return {path.stem: json.loads(path.read_text()) for path in sorted(self.cells.glob("*.json"))}

    def write(self, name: str, record: dict[str, Any]) -> dict[str, Any]:
        """Write ``record`` atomically as ``cells/<name>.json``; returns it as read back from JSON."""
        self.cells.mkdir(parents=True, exist_ok=True)
        text = json.dumps(record, indent=1)
        atomic_write_text(self.cells / f"{name}.json", text)
        return json.loads(text)
