"""Outputs of the experiment: per-cell statistics, the markdown tables, the plots, the JSON.

Statistics are over seeds: the mean and the sample standard deviation (``n - 1``; 0 for one seed)
of test accuracy, in percent. Gains over a baseline are paired: seed ``s`` gives every method the
same images and initialisation, so the per-seed differences are reported with their mean and its
standard error (``std / sqrt(n)``), which is much smaller than the spread of either method.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..io.files import atomic_write, atomic_write_text
from .methods import METHODS

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

RESULTS_JSON = "results.json"
TABLE_MD = "table.md"
PLOT_PNG = "few_shot.png"
NOISE_PNG = "noise.png"


def _stats(values: list[float]) -> dict[str, float]:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def _size(run: dict[str, Any]) -> str:
    return "all" if run["samples_per_class"] is None else str(run["samples_per_class"])


def _main_runs(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [run for run in runs if run.get("phase") == "main"]


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {size label: {"mean", "std", "n"}}}`` of test accuracy in percent."""
    cells: dict[str, dict[str, list[float]]] = {}
    for run in _main_runs(runs):
        cells.setdefault(run["method"], {}).setdefault(_size(run), []).append(100.0 * run["test_acc"])
    return {method: {size: _stats(v) for size, v in by_size.items()} for method, by_size in cells.items()}


def summarise_agreement(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {size label: {"mean", "std", "n"}}}`` of the held-out gradient agreement (cosine) of the main
    runs that measured it (see :mod:`jacplug.agreement`)."""
    cells: dict[str, dict[str, list[float]]] = {}
    for run in _main_runs(runs):
        if "agreement_cosine" in run:
            cells.setdefault(run["method"], {}).setdefault(_size(run), []).append(run["agreement_cosine"])
    return {method: {size: _stats(v) for size, v in by_size.items()} for method, by_size in cells.items()}


def agreement_table(agreement: dict[str, dict[str, dict[str, float]]], sizes: list[str]) -> str:
    """Methods as rows, samples per class as columns: the mean cosine ``± std`` over seeds, three decimals."""
    lines = ["Held-out agreement of the students' input gradients with the teacher's (cosine of the teacher's "
             "top-1 rows; 1 = the same direction):", "", "| method | " + " | ".join(f"{s} / class" for s in sizes)
             + " |", "|---|" + "---:|" * len(sizes)]
    for method, cells in agreement.items():
        row = [f"{cells[s]['mean']:.3f} ± {cells[s]['std']:.3f}" if s in cells else "" for s in sizes]
        lines.append(f"| {METHODS[method].label} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def summarise_noise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, dict[str, float]]]]:
    """``{method: {size label: {sigma: {"mean", "std", "n"}}}}`` of noisy test accuracy in percent."""
    cells: dict[str, dict[str, dict[str, list[float]]]] = {}
    for run in _main_runs(runs):
        for sigma, acc in run.get("test_acc_noise", {}).items():
            cells.setdefault(run["method"], {}).setdefault(_size(run), {}).setdefault(sigma, []).append(100.0 * acc)
    return {method: {size: {sigma: _stats(v) for sigma, v in by_sigma.items()} for size, by_sigma in by_size.items()}
            for method, by_size in cells.items()}


def paired_gains(runs: list[dict[str, Any]], baseline: str, sigma: str | None = None
                 ) -> dict[str, dict[str, dict[str, Any]]]:
    """``{method: {size label: {"mean", "se", "per_seed"}}}``: test accuracy minus the baseline's, in
    points, seed by seed (clean, or at noise level ``sigma``). Seeds the baseline lacks are skipped."""

    def score(run: dict[str, Any]) -> float:
        return 100.0 * (run["test_acc"] if sigma is None else run["test_acc_noise"][sigma])

    base = {(_size(r), r["seed"]): score(r) for r in _main_runs(runs) if r["method"] == baseline}
    diffs: dict[str, dict[str, list[float]]] = {}
    for run in _main_runs(runs):
        key = (_size(run), run["seed"])
        if run["method"] != baseline and key in base:
            diffs.setdefault(run["method"], {}).setdefault(key[0], []).append(score(run) - base[key])
    return {
        method: {size: {"mean": statistics.fmean(d), "se": statistics.stdev(d) / len(d) ** 0.5 if len(d) > 1 else 0.0,
                        "per_seed": d}
                 for size, d in by_size.items()}
        for method, by_size in diffs.items()
    }


def _gain(cell: dict[str, Any]) -> str:
    seeds = ", ".join(f"{d:+.1f}" for d in cell["per_seed"])
    return f"{cell['mean']:+.1f} ± {cell['se']:.1f} ({seeds})"


def gains_table(gains: dict[str, dict[str, dict[str, Any]]], baseline: str, sizes: list[str]) -> str:
    """Rows ``method over baseline``, columns sizes, cells ``mean ± SE (per seed)`` in points."""
    lines = [f"| gain over {METHODS[baseline].label}, points (± SE; per seed) | "
             + " | ".join(f"{s} / class" for s in sizes) + " |", "|---|" + "---|" * len(sizes)]
    for method, cells in gains.items():
        lines.append(f"| {METHODS[method].label} | " + " | ".join(_gain(cells[s]) if s in cells else "" for s in sizes)
                     + " |")
    return "\n".join(lines) + "\n"


def selection_table(selection: list[dict[str, Any]], score: Any) -> str:
    """The validation grid: one row per (tuned weight, selection size), one column per weight value,
    cells ``mean ± std`` of ``score(record)`` in percent over the selection seeds."""
    cells: dict[tuple[str, str], dict[float, list[float]]] = {}
    for record in selection:
        key, weight = next(iter(record["weights"].items()))
        cells.setdefault((key, _size(record)), {}).setdefault(weight, []).append(100.0 * score(record))
    lines = ["| weight | selection size | grid: validation score (%), mean ± std over seeds |", "|---|---|---|"]
    for (key, size), by_weight in cells.items():
        best = max(by_weight, key=lambda w: (statistics.fmean(by_weight[w]), -w))
        text = []
        for weight in sorted(by_weight):
            stats = _stats(by_weight[weight])
            item = f"{weight:g}: {stats['mean']:.1f} ± {stats['std']:.1f}"
            text.append(f"**{item}**" if weight == best else item)
        lines.append(f"| {key} | {size} / class | " + "; ".join(text) + " |")
    return "\n".join(lines) + "\n"


def noise_table(noise: dict[str, dict[str, dict[str, dict[str, float]]]], size: str,
                teacher: dict[str, float] | None) -> str:
    """Rows methods (and the teacher), columns noise sigma, cells ``mean ± std`` test accuracy (%)."""
    sigmas = sorted({s for cells in noise.values() for s in cells.get(size, {})}, key=float)
    lines = ["| method | " + " | ".join(f"σ = {s}" for s in sigmas) + " |", "|---|" + "---:|" * len(sigmas)]
    if teacher:
        lines.append("| teacher | " + " | ".join(f"{100 * teacher[s]:.1f}" for s in sigmas) + " |")
    for method, cells in noise.items():
        if size in cells:
            lines.append(f"| {METHODS[method].label} | "
                         + " | ".join(f"{cells[size][s]['mean']:.1f} ± {cells[size][s]['std']:.1f}" for s in sigmas)
                         + " |")
    return "\n".join(lines) + "\n"


def markdown_table(summary: dict[str, dict[str, dict[str, float]]], sizes: list[str]) -> str:
    """Methods as rows, samples per class as columns, ``mean ± std``; the best mean per column in bold."""
    best = {s: max((cells[s]["mean"] for cells in summary.values() if s in cells), default=None) for s in sizes}
    lines = ["| method | " + " | ".join(f"{s} / class" for s in sizes) + " |",
             "|---|" + "---:|" * len(sizes)]
    for method, cells in summary.items():
        row = []
        for s in sizes:
            if s not in cells:
                row.append("")
                continue
            text = f"{cells[s]['mean']:.1f} ± {cells[s]['std']:.1f}"
            row.append(f"**{text}**" if cells[s]["mean"] == best[s] else text)
        lines.append(f"| {METHODS[method].label} | " + " | ".join(row) + " |")
    return "\n".join(lines) + "\n"


def _axes() -> tuple[Figure, Axes]:
    """A figure of its own and its axes: a :class:`matplotlib.figure.Figure`, not ``pyplot``'s, so no backend is
    chosen or changed (a notebook running an experiment keeps its own) and nothing is left open."""
    from matplotlib.figure import Figure  # matplotlib: start-up time, only the plots need it

    figure = Figure(figsize=(7, 4.5))
    return figure, figure.subplots()


def _save(fig: Figure, ax: Axes, path: Path, title: str, xlabel: str) -> None:
    """Labels, grid and legend, then the PNG written atomically."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda fh: fig.savefig(fh, dpi=120, format="png"))


def plot_results(summary: dict[str, dict[str, dict[str, float]]], sizes: list[str], full_per_class: float, path: Path,
                 title: str) -> None:
    """Test accuracy vs samples per class (log x; "all" at the full split's mean per class), one line
    per method, error bars of one standard deviation."""
    xs = {s: full_per_class if s == "all" else float(s) for s in sizes}
    fig, ax = _axes()
    for i, (method, cells) in enumerate(summary.items()):
        present = [s for s in sizes if s in cells]
        offset = 1 + 0.03 * (i - (len(summary) - 1) / 2)  # spread the error bars so they do not hide each other
        ax.errorbar([xs[s] * offset for s in present], [cells[s]["mean"] for s in present],
                    yerr=[cells[s]["std"] for s in present], marker="o", markersize=4, capsize=3,
                    label=METHODS[method].label)
    ax.set_xscale("log")
    ax.set_xticks([xs[s] for s in sizes])
    ax.set_xticklabels([f"all (~{full_per_class:.0f})" if s == "all" else s for s in sizes])
    ax.minorticks_off()
    _save(fig, ax, path, title, "training samples per class (student)")


def plot_noise(noise: dict[str, dict[str, dict[str, dict[str, float]]]], size: str,
               teacher: dict[str, float] | None, path: Path, title: str) -> None:
    """Test accuracy vs noise sigma at one sample size, one line per method (error bars: one std
    over seeds), the teacher dashed."""
    fig, ax = _axes()
    if teacher:
        sigmas = sorted(teacher, key=float)
        ax.plot([float(s) for s in sigmas], [100 * teacher[s] for s in sigmas], "k--", label="teacher")
    for i, (method, cells) in enumerate(noise.items()):
        if size not in cells:
            continue
        sigmas = sorted(cells[size], key=float)
        shift = 0.006 * (i - (len(noise) - 1) / 2)  # spread the error bars so they do not hide each other
        ax.errorbar([float(s) + shift for s in sigmas], [cells[size][s]["mean"] for s in sigmas],
                    yerr=[cells[size][s]["std"] for s in sigmas], marker="o", markersize=4, capsize=3,
                    label=METHODS[method].label)
    _save(fig, ax, path, title, "test-time Gaussian noise σ (units of the pixel std)")


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=False) + "\n")


def write_table(path: Path, table: str) -> None:
    atomic_write_text(path, table)
