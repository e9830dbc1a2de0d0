"""The few-sample distillation experiment: does Jacobian matching help a data-starved student?

``run_experiment(ExperimentConfig(...))`` trains the teacher once, selects loss weights on the
validation split, runs every method x samples-per-class x seed, and writes ``results.json``,
``table.md`` and ``few_shot.png`` to ``config.out``. See :mod:`.runs` for the protocol,
:mod:`.methods` for the compared losses, :mod:`.report` for the outputs; ``jacplug experiment`` and
``benchmarks/few_shot.py`` are its command lines.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any, Callable

import torch

from ..errors import UserError
from ..pipeline.device import init_runtime
from ..pipeline.evaluate import accuracy
from . import report
from .runs import (
    ExperimentConfig,
    Executor,
    RunSpec,
    choose_weights,
    hardware,
    load_splits,
    load_teacher,
    main_specs,
    prepare_teacher,
    run_one,
    selection_specs,
    size_label,
)

__all__ = ["ExperimentConfig", "RunSpec", "run_experiment", "run_one", "choose_weights", "selection_specs"]


def _print(line: str) -> None:
    print(line, flush=True)  # progress must show up when stdout is a file or a pipe


def run_experiment(config: ExperimentConfig, echo: Callable[[str], None] = _print) -> dict[str, Any]:
    """Run the whole protocol; returns the results dict also written to ``results.json``.

    Sets ``torch.set_num_threads(config.threads)`` while it runs (in-process runs use it too) and
    restores the caller's thread count afterwards.
    """
    config.validate()
    threads = torch.get_num_threads()
    try:
        return _run(config, echo)
    finally:
        torch.set_num_threads(threads)


def _run(config: ExperimentConfig, echo: Callable[[str], None]) -> dict[str, Any]:
    started = time.perf_counter()
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(config.threads)
    runtime = init_runtime(config.device)
    full = load_splits(config)
    if full.val is None:
        raise UserError(f"dataset {config.dataset!r} has no validation split; the loss weights must be chosen on one")
    full_per_class = len(full.train) / full.num_classes
    sizes = [size_label(n) for n in config.samples_per_class]

    teacher_path, teacher_source = prepare_teacher(config, full, runtime, out)
    teacher = load_teacher(config, full, teacher_path, runtime)
    results: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "hardware": {**hardware(), "device": str(runtime.device), "workers": config.workers,
                     "threads_per_worker": config.threads},
        "teacher": {"model": config.teacher, "source": teacher_source,
                    "val_acc": accuracy(teacher, full.val, runtime, batch_size=config.eval_batch_size, show=False,
                                        desc="val"),
                    "test_acc": accuracy(teacher, full.test, runtime, batch_size=config.eval_batch_size, show=False,
                                         desc="test"),
                    "time_s": round(time.perf_counter() - started, 1)},
        "train_samples_full": len(full.train),
    }
    echo(f"teacher {config.teacher}: test {100 * results['teacher']['test_acc']:.1f}% ({teacher_source}), "
         f"{results['teacher']['time_s']:.0f} s")
    executor = Executor(config, teacher_path, runtime)
    try:
        specs = selection_specs(config)
        phase_start = time.perf_counter()
        selection = executor.map(specs, _progress(echo, "select", len(specs), phase_start))
        chosen = choose_weights(config, selection, full_per_class)
        results.update(selection=selection, chosen_weights=chosen,
                       selection_time_s=round(time.perf_counter() - phase_start, 1))
        report.write_json(out / report.RESULTS_JSON, results)
        echo(f"chosen on validation: {chosen}")

        specs = main_specs(config, chosen)
        phase_start = time.perf_counter()
        runs = executor.map(specs, _progress(echo, "run", len(specs), phase_start))
    finally:
        executor.close()
    summary = report.summarise(runs)
    table = report.markdown_table(summary, sizes)
    results.update(runs=runs, summary=summary, main_time_s=round(time.perf_counter() - phase_start, 1),
                   wall_time_s=round(time.perf_counter() - started, 1))
    report.write_json(out / report.RESULTS_JSON, results)
    report.write_table(out / report.TABLE_MD, table)
    title = f"{config.teacher} -> {config.student} on {config.dataset}, {len(config.seeds)} seeds"
    report.plot(summary, sizes, full_per_class, out / report.PLOT_PNG, title)
    echo(table)
    echo(f"wall time {results['wall_time_s']:.0f} s; wrote {out / report.RESULTS_JSON}, {out / report.TABLE_MD}, "
         f"{out / report.PLOT_PNG}")
    return results


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
