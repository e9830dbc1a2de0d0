"""Outputs of the experiment: per-cell statistics, the markdown table, the plot, the JSON.

Statistics are over seeds: the mean and the sample standard deviation (``n - 1``; 0 for one seed)
of test accuracy, in percent.
"""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from ..pipeline.checkpoint import atomic_write, atomic_write_text
from .methods import METHODS

RESULTS_JSON = "results.json"
TABLE_MD = "table.md"
PLOT_PNG = "few_shot.png"


def summarise(runs: list[dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """``{method: {size label: {"mean", "std", "n"}}}`` of test accuracy in percent."""
    cells: dict[str, dict[str, list[float]]] = {}
    for run in runs:
        if run.get("phase") != "main":
            continue
        size = "all" if run["samples_per_class"] is None else str(run["samples_per_class"])
        cells.setdefault(run["method"], {}).setdefault(size, []).append(100.0 * run["test_acc"])
    return {
        method: {
            size: {"mean": statistics.fmean(v), "std": statistics.stdev(v) if len(v) > 1 else 0.0, "n": len(v)}
            for size, v in by_size.items()
        }
        for method, by_size in cells.items()
    }


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


def plot(summary: dict[str, dict[str, dict[str, float]]], sizes: list[str], full_per_class: float, path: Path,
         title: str) -> None:
    """Test accuracy vs samples per class (log x; "all" at the full split's mean per class), one line
    per method, error bars of one standard deviation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = {s: full_per_class if s == "all" else float(s) for s in sizes}
    fig, ax = plt.subplots(figsize=(7, 4.5))
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
    ax.set_xlabel("training samples per class (student)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=False) + "\n")


def write_table(path: Path, table: str) -> None:
    atomic_write_text(path, table)
