"""Runs the experiment (:func:`run_experiment`): the teacher once, weight selection on the validation
split, the main grid, then the reports; holding the output directory's lock and stopping the worker
processes on any error, Ctrl-C or ``kill``. Each finished cell is recorded at once, so an interrupted
experiment resumes with ``resume`` (:mod:`.records`); ``results.json`` is written last."""

from __future__ import annotations

import dataclasses
import json
import signal
import threading
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import UserError
from ..training.prepare import load_data
from ..training.runtime import init_runtime
from ..training.evaluate import accuracy
from ..io.folders import check_folder, removed_if_unused
from ..io.lock import RunDirLock
from ..training.teacher import TEACHER_FILE
from . import report
from .executors import CellExecutor, make_executor
from .protocol import (
    ExperimentConfig,
    check_before_training,
    choose_weights,
    hardware,
    load_teacher,
    main_specs,
    noisy_accuracy,
    teacher_weights,
    selection_score,
    selection_specs,
    size_label,
)
from .records import TEACHER_RECORD, Records, spec_of

def _print(line: str) -> None:
    print(line, flush=True)  # progress must show up when stdout is a file or a pipe


def run_experiment(config: ExperimentConfig, echo: Callable[[str], None] = _print) -> dict[str, Any]:
    """Run the whole protocol; returns the results dict also written to ``results.json``.

    Sets ``torch.set_num_threads(config.threads)`` while it runs (in-process runs use it too) and
    restores the caller's thread count afterwards.
    """
    config.validate()
    threads = torch.get_num_threads()
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm) if in_main_thread else None
    try:
        return _run(config, echo)
    finally:
        torch.set_num_threads(threads)
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """``kill`` becomes ``SystemExit``, so the worker processes are stopped too instead of left running."""
    raise SystemExit(128 + signum)


def _run(config: ExperimentConfig, echo: Callable[[str], None]) -> dict[str, Any]:
    """The protocol, holding ``config.out``'s run-directory lock: a second experiment writing the same
    files at the same time is refused in one line (see :mod:`jacplug.io.lock`)."""
    check_folder(config.out, "--out")
    with removed_if_unused(config.out), RunDirLock(config.out):  # a refused experiment leaves no runs/ behind
        records = Records(config.out)
        state = records.state(config)
        if state == "finished":
            done = Path(config.out) / report.RESULTS_JSON
            echo(f"the experiment in {str(config.out)!r} is finished ({done}); nothing to run")
            return json.loads(done.read_text())
        return _run_locked(config, echo, records, resume=state == "resume")


def _run_locked(config: ExperimentConfig, echo: Callable[[str], None], records: Records,
                resume: bool) -> dict[str, Any]:
    started = time.perf_counter()
    torch.set_num_threads(config.threads)
    runtime = init_runtime(config.device)
    full = load_data(config)
    if full.val is None:
        raise UserError(f"dataset {config.dataset!r} has no validation split; the loss weights must be chosen on one")
    check_before_training(config, full, runtime)
    executor = make_executor(config, runtime)  # refuses --devices or --ray-address before the teacher trains
    try:
        return _experiment(config, echo, records, resume, executor, full, runtime, started)
    except BaseException:  # Ctrl-C or an error: stop the workers now rather than finish their queue
        executor.close(abort=True)
        raise


def _experiment(config: ExperimentConfig, echo: Callable[[str], None], records: Records, resume: bool,
                executor: CellExecutor, full, runtime, started: float) -> dict[str, Any]:
    out = Path(config.out)
    full_per_class = len(full.train) / full.num_classes
    sizes = [size_label(n) for n in config.samples_per_class]
    if not resume:
        records.start(config)
    finished = records.finished()

    if TEACHER_RECORD in finished and (config.teacher_checkpoint or (out / TEACHER_FILE).is_file()):
        teacher_record = finished[TEACHER_RECORD]  # trained and scored before the interruption
        teacher_path = Path(config.teacher_checkpoint or out / TEACHER_FILE)
    else:
        teacher_path, teacher_record = _teacher(config, full, runtime, out, started)
        teacher_record = records.write(TEACHER_RECORD, teacher_record)
    results: dict[str, Any] = {
        "config": {k: v for k, v in dataclasses.asdict(config).items() if k != "resume"},
        "hardware": {**hardware(), "device": str(runtime.device), "workers": config.workers,
                     "threads_per_worker": config.threads},
        "teacher": teacher_record,
        "train_samples_full": len(full.train),
    }
    echo(f"teacher {config.teacher}: test {100 * teacher_record['test_acc']:.1f}% ({teacher_record['source']}), "
         f"{teacher_record['time_s']:.0f} s")
    executor.start(teacher_path)
    specs = selection_specs(config)
    phase_start = time.perf_counter()
    selection = _cells(executor, records, finished, specs, _progress(echo, "select", len(specs), phase_start))
    chosen = choose_weights(config, selection, full_per_class)
    results.update(selection=selection, chosen_weights=chosen,
                   selection_time_s=round(time.perf_counter() - phase_start, 1))
    echo(f"chosen on validation: {chosen}")

    specs = main_specs(config, chosen)
    phase_start = time.perf_counter()
    runs = _cells(executor, records, finished, specs, _progress(echo, "run", len(specs), phase_start))
    executor.close()
    summary = report.summarise(runs)
    results.update(runs=runs, summary=summary, main_time_s=round(time.perf_counter() - phase_start, 1),
                   wall_time_s=round(time.perf_counter() - started, 1))
    title = f"{config.teacher} -> {config.student} on {config.dataset}, {len(config.seeds)} seeds"
    table = _write_reports(config, results, sizes, full_per_class, title, out)
    echo(table)
    echo(f"wall time {results['wall_time_s']:.0f} s; wrote {out / report.RESULTS_JSON}, {out / report.TABLE_MD} "
         "and the plots")
    return results


def _teacher(config: ExperimentConfig, full, runtime, out: Path, started: float) -> tuple[Path, dict[str, Any]]:
    """Train (or take) the teacher and score it: its weights file and its record."""
    teacher_path, teacher_source = teacher_weights(config, full, runtime, out)
    teacher = load_teacher(config, full, teacher_path, runtime)
    record: dict[str, Any] = {"model": config.teacher, "source": teacher_source}
    for name in ("val", "test"):
        split = getattr(full, name)
        record[f"{name}_acc"] = accuracy(teacher, split, runtime, batch_size=config.eval_batch_size,
                                         show=False, desc=name)
        if config.noise_sigmas:
            record[f"{name}_acc_noise"] = noisy_accuracy(teacher, split, config, runtime)
    record["time_s"] = round(time.perf_counter() - started, 1)
    return teacher_path, record


def _cells(executor: CellExecutor, records: Records, finished: dict[str, dict[str, Any]], specs: list,
           done: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
    """The records of ``specs`` in their order: those finished before an interruption as recorded, the
    others run now, each recorded the moment it finishes."""
    ran: dict[str, dict[str, Any]] = {}

    def record(result: dict[str, Any]) -> None:
        name = spec_of(result).name
        ran[name] = records.write(name, result)
        done(result)

    executor.map([spec for spec in specs if spec.name not in finished], record)
    return [finished.get(spec.name) or ran[spec.name] for spec in specs]


def _write_reports(config: ExperimentConfig, results: dict[str, Any], sizes: list[str], full_per_class: float,
                   title: str, out: Path) -> str:
    """``results.json``; ``table.md`` with the accuracy table, the paired gains over KD (or the first
    method), the validation grid and, with noise levels, one accuracy-vs-sigma table per size; the
    plots: accuracy vs samples per class (when there are several sizes), accuracy vs sigma."""
    runs, summary = results["runs"], results["summary"]
    baseline = "kd" if "kd" in config.methods else config.methods[0]
    sections = [report.markdown_table(summary, sizes)]
    if len(config.methods) > 1:
        sections.append(report.gains_table(report.paired_gains(runs, baseline), baseline, sizes))
    agreement = report.summarise_agreement(runs)
    if agreement:
        results["agreement_summary"] = agreement
        sections.append(report.agreement_table(agreement, sizes))
    if results["selection"]:
        sections.append(report.selection_table(results["selection"], lambda r: selection_score(config, r)))
    if config.noise_sigmas:
        noise = report.summarise_noise(runs)
        results["noise_summary"] = noise
        teacher = results["teacher"]["test_acc_noise"]
        for size in sizes:
            sections.append(f"Test accuracy (%) under input noise, {size} / class:\n\n"
                            + report.noise_table(noise, size, teacher))
            if len(config.methods) > 1:
                sections.extend(f"Paired gain at σ = {sigma}, {size} / class:\n\n"
                                + report.gains_table(report.paired_gains(runs, baseline, sigma), baseline, [size])
                                for sigma in teacher if float(sigma) > 0)
        for size in sizes:
            name = report.NOISE_PNG if len(sizes) == 1 else f"noise_{size}.png"
            report.plot_noise(noise, size, teacher, out / name, f"{title}, {size} / class")
    if len(sizes) > 1:
        report.plot_results(summary, sizes, full_per_class, out / report.PLOT_PNG, title)
    table = "\n".join(sections)
    report.write_table(out / report.TABLE_MD, table)
    report.write_json(out / report.RESULTS_JSON, results)  # last: its presence marks the experiment finished
    return table


def _progress(echo: Callable[[str], None], phase: str, total: int, start: float) -> Callable[[dict[str, Any]], None]:
    count = 0

    def done(record: dict[str, Any]) -> None:
        nonlocal count
        count += 1
        score = ", ".join(f"{k} {100 * record[k]:.1f}%" for k in ("val_acc", "test_acc") if k in record)
        echo(f"[{phase} {count}/{total} {time.perf_counter() - start:.0f}s] {record['method']} "
             f"n={size_label(record['samples_per_class'])} seed={record['seed']} {record['weights']}: {score} "
             f"({record['time_s']:.1f} s)")

    return done
