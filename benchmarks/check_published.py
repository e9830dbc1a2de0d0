"""Do the published figures still come out of the code? Reruns a cheap subset and compares it with the records.

Run before a release (about two minutes on 2 cores); ``tests/test_published.py`` covers the cells that need no
trained teacher on every test run. This script reruns:

- ``make demo``'s run, ``jacplug train --teacher resnet50 --student resnet18``, with the thread count the
  published copy recorded (``docs/results/demo/run.json``): every evaluation line of its ``metrics.jsonl``
  (accuracies, loss terms and agreement; not times);
- the few-sample experiment's teacher and its KD and KD + Eq. 10 cells at 5 images per class, seed 0, with the
  weight the published run chose: the teacher's accuracies, each cell's accuracies and final loss terms.

Results are bit-identical only on the CPU model and torch build that published them, and a run that trains
from a teacher amplifies another CPU's rounding by several points, so no tolerance can tell a rounding
difference from a change to the code. On the publishing machine the rerun must equal the published records
(``docs/results/demo``, ``docs/results/few_shot``). On another machine it must equal that machine's reference,
``docs/results/reference/<cpu>-torch-<version>.json``, which ``--record`` writes once, from the commit that
published the page; without one the script says how to make it and exits 2. Exit status 1 when a figure moved.

Usage: ``python benchmarks/check_published.py [--out runs/check-published] [--record]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

from jacplug.experiment.protocol import hardware, rounds_alike

RESULTS = Path(__file__).resolve().parents[1] / "docs" / "results"
REFERENCES = RESULTS / "reference"
CLI = ["-c", "import sys; from jacplug.cli.main import main; raise SystemExit(main(sys.argv[1:]))"]
CELL_KEYS = ("val_acc", "test_acc", "final_terms")


def run(args: list[str], threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print("$", f"OMP_NUM_THREADS={threads}", "jacplug", " ".join(args), flush=True)
    subprocess.run([sys.executable, *CLI, *args], env=env, check=True, stdout=subprocess.DEVNULL)


def evaluation_lines(path: Path) -> list[dict[str, Any]]:
    """The lines of a ``metrics.jsonl`` that hold scores (not the per-step ones), times left out."""
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [{k: v for k, v in line.items() if k != "time_s"} for line in lines if line["kind"] != "step"]


def few_shot_figures(results: dict[str, Any]) -> dict[str, Any]:
    """The checked figures of a few-sample ``results.json``: the teacher's accuracies and the main cells'."""
    cells = {f"{r['method']} n{r['samples_per_class']} seed {r['seed']}": {k: r[k] for k in CELL_KEYS}
             for r in results["runs"] if r["phase"] == "main"}
    return {"teacher": {k: results["teacher"][k] for k in ("val_acc", "test_acc")}, "cells": cells}


def published_figures() -> dict[str, Any]:
    return {"demo": evaluation_lines(RESULTS / "demo" / "metrics.jsonl"),
            "few_shot": few_shot_figures(json.loads((RESULTS / "few_shot" / "results.json").read_text()))}


def rerun(out: Path, demo_threads: int, weight: float) -> dict[str, Any]:
    run(["train", "--teacher", "resnet50", "--student", "resnet18", "--out", str(out / "demo")], demo_threads)
    run(["experiment", "--methods", "kd", "kd+jacobian", "--samples-per-class", "5", "--seeds", "1",
         "--select-at", "5", "--jacobian-weights", str(weight), "--out", str(out / "few_shot")], 1)
    return {"demo": evaluation_lines(out / "demo" / "metrics.jsonl"),
            "few_shot": few_shot_figures(json.loads((out / "few_shot" / "results.json").read_text()))}


def reference_path(machine: dict[str, Any]) -> Path:
    slug = re.sub(r"[^a-z0-9]+", "-", f"{machine['cpu']} torch {machine['torch']}".lower()).strip("-")
    return REFERENCES / f"{slug}.json"


def compare(published: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Every checked figure, printed side by side; the labels of those that differ."""
    pairs = [(f"make demo {p['kind']} {p.get('epoch', i)}", p, n)
             for i, (p, n) in enumerate(zip(published["demo"], now["demo"]))]
    pairs.append(("make demo evaluation count", len(published["demo"]), len(now["demo"])))
    pairs += [(f"few-sample teacher {k}", v, now["few_shot"]["teacher"][k])
              for k, v in published["few_shot"]["teacher"].items()]
    for name, cell in now["few_shot"]["cells"].items():
        pairs += [(f"few-sample {name} {k}", published["few_shot"]["cells"][name][k], cell[k]) for k in CELL_KEYS]
    moved = []
    for label, was, is_ in pairs:
        print(f"  {'same' if was == is_ else 'MOVED'}  {label}: expected {was}, now {is_}")
        if was != is_:
            moved.append(label)
    return moved


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="runs/check-published", help="a new folder for the reruns")
    parser.add_argument("--record", action="store_true",
                        help="write this machine's reference (from the commit that published the page)")
    args = parser.parse_args(argv)
    demo = json.loads((RESULTS / "demo" / "run.json").read_text())
    few_shot = json.loads((RESULTS / "few_shot" / "results.json").read_text())
    publisher, here = demo["hardware"], hardware()
    if (few_shot["hardware"]["cpu"], few_shot["hardware"]["torch"]) != (publisher["cpu"], publisher["torch"]):
        raise SystemExit("docs/results/demo and docs/results/few_shot were published on different machines")
    at_publisher = rounds_alike(publisher)
    path = reference_path(here)
    if args.record and (at_publisher or path.exists()):
        raise SystemExit(f"nothing to record: {'the published records are' if at_publisher else path} "
                         f"this machine's reference already")
    if not (args.record or at_publisher or path.exists()):
        print(f"The page was published on {publisher['cpu']} with torch {publisher['torch']}; this is {here['cpu']} "
              f"with torch {here['torch']}, which rounds differently and has no reference ({path.name}). Record one "
              "from the commit that published the page: python benchmarks/check_published.py --record")
        return 2

    now = rerun(Path(args.out), demo["torch_threads"], few_shot["chosen_weights"]["5"]["jacobian"])
    if args.record:
        REFERENCES.mkdir(exist_ok=True)
        with path.open("x") as file:
            json.dump({"hardware": here, **now}, file, indent=1)
        print(f"wrote {path}")
        return 0
    if at_publisher:
        print("compared with the published records")
        reference = published_figures()
    else:
        print(f"compared with this machine's reference, {path}")
        reference = json.loads(path.read_text())
    moved = compare(reference, now)
    print(f"{len(moved)} figure(s) moved" if moved else "every figure checked is as published")
    return 1 if moved else 0


if __name__ == "__main__":
    raise SystemExit(main())
