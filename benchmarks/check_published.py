"""Do the published figures still come out of the code? Reruns a cheap subset and compares it with the records.

Run before a release (about two minutes on 2 cores); ``tests/test_published.py`` covers the cells that need no
trained teacher on every test run. This script reruns:

- ``make demo``'s run, ``jacplug train --teacher resnet50 --student resnet18``, with the thread count the
  published copy recorded (``docs/results/demo/run.json``), and compares every evaluation line of its ``metrics.jsonl`` (accuracies and loss
  terms; not times) with ``docs/results/demo/metrics.jsonl``;
- the few-sample experiment's teacher and its KD and KD + Eq. 10 cells at 5 images per class, seed 0, with the
  weight the published run chose, and compares the teacher's accuracies and each cell's accuracies and final
  loss terms with ``docs/results/few_shot/results.json``.

Results are bit-identical only on the CPU model, torch build and thread count that published them. There every
figure must be equal; on another machine the script says so and compares the accuracies only, each within
``OTHER_CPU_POINTS``. Exit status 1 when a figure moved.

Usage: ``python benchmarks/check_published.py [--out runs/check-published]``
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

from jacplug.experiment.protocol import OTHER_CPU_POINTS, hardware, rounds_alike

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
CLI = ["-c", "import sys; from jacplug.cli.main import main; raise SystemExit(main(sys.argv[1:]))"]


def run(args: list[str], threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print("$", f"OMP_NUM_THREADS={threads}", "jacplug", " ".join(args), flush=True)
    subprocess.run([sys.executable, *CLI, *args], env=env, check=True, stdout=subprocess.DEVNULL)


def evaluation_lines(path: Path) -> list[dict]:
    """The lines of a ``metrics.jsonl`` that hold scores (not the per-step ones), times left out."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in line.items() if k != "time_s"} for line in lines if line["kind"] != "step"]


def close(published: object, now: object) -> bool:
    """Equal but for another CPU's rounding: accuracies within ``OTHER_CPU_POINTS``, loss terms not compared."""
    if isinstance(published, dict) and isinstance(now, dict):
        return published.keys() == now.keys() and all(
            close(value, now[key]) for key, value in published.items() if "acc" in key or key in ("kind", "epoch"))
    if isinstance(published, float) and isinstance(now, float):
        return abs(published - now) * 100 <= OTHER_CPU_POINTS
    return published == now


def compare(label: str, published: object, now: object, failures: list[str], exact: bool) -> None:
    agree = published == now if exact else close(published, now)
    word = ("same" if exact else "close") if agree else "MOVED"
    print(f"  {word}  {label}: published {published}, now {now}")
    if not agree:
        failures.append(label)


def announce(name: str, published: dict) -> bool:
    """Whether ``name``'s figures must come out exactly here; says so when they cannot."""
    if rounds_alike(published):
        return True
    here = hardware()
    print(f"note: {name} was published on {published['cpu']} with torch {published['torch']}; this is "
          f"{here['cpu']} with torch {here['torch']}: comparing accuracies within {OTHER_CPU_POINTS} points",
          flush=True)
    return False


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/check-published", help="a new folder for the reruns")
    args = parser.parse_args(argv)
    out = Path(args.out)
    few_shot = json.loads((RESULTS / "few_shot" / "results.json").read_text())
    demo = json.loads((RESULTS / "demo" / "run.json").read_text())
    failures: list[str] = []

    threads, exact = demo["torch_threads"], announce("make demo", demo["hardware"])
    run(["train", "--teacher", "resnet50", "--student", "resnet18", "--out", str(out / "demo")], threads)
    published_lines = evaluation_lines(RESULTS / "demo" / "metrics.jsonl")
    now_lines = evaluation_lines(out / "demo" / "metrics.jsonl")
    print(f"make demo ({threads} threads): {len(published_lines)} evaluation lines")
    for index, (published, now) in enumerate(zip(published_lines, now_lines)):
        compare(f"demo {published['kind']} {published.get('epoch', index)}", published, now, failures, exact)
    compare("demo evaluation count", len(published_lines), len(now_lines), failures, True)

    exact = announce("few-sample experiment", few_shot["hardware"])
    chosen = few_shot["chosen_weights"]["5"]["jacobian"]
    run(["experiment", "--methods", "kd", "kd+jacobian", "--samples-per-class", "5", "--seeds", "1",
         "--select-at", "5", "--jacobian-weights", str(chosen), "--out", str(out / "few_shot")], 1)
    now = json.loads((out / "few_shot" / "results.json").read_text())
    print(f"few-sample experiment (teacher, and 5 images per class, seed 0, λ = {chosen:g})")
    for key in ("val_acc", "test_acc"):
        compare(f"teacher {key}", few_shot["teacher"][key], now["teacher"][key], failures, exact)
    for cell in now["runs"]:
        record = next(r for r in few_shot["runs"] if (r["method"], r["samples_per_class"], r["seed"], r["weights"])
                      == (cell["method"], cell["samples_per_class"], cell["seed"], cell["weights"]))
        for key in ("val_acc", "test_acc", "final_terms") if exact else ("val_acc", "test_acc"):
            compare(f"{cell['method']} n5 seed 0 {key}", record[key], cell[key], failures, exact)

    print(f"{len(failures)} figure(s) moved" if failures else "every figure checked is as published")
    return 1 if failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
