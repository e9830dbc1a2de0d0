"""What the held-out agreement costs a `jacplug train` run: its set-up, the before-training maps, one
measurement per evaluation and the picture, timed in one process on the default command's models
(resnet50 teacher, resnet18 student, the embedded digits at 16 px, --agreement-images 256).

    python benchmarks/agreement_cost.py [--evaluations 4]

Compare the total with the run's time (`make demo` prints it); docs/results.md has the figures. The first
set-up is run once untimed: in a run, both models have been used before the student phase measures.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from jacplug.training.config import TrainConfig
from jacplug.training.heldout import HeldOutAgreement
from jacplug.models.build import build_model
from jacplug.training.prepare import load_data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--evaluations", type=int, default=4, help="evaluations of the run (make demo: 4)")
    args = parser.parse_args()
    torch.manual_seed(0)
    config = TrainConfig()
    splits = load_data(config)
    teacher = build_model("teacher", config.teacher, splits, {}).module.eval().requires_grad_(False)
    student = build_model("student", config.student, splits, {}).module.train()
    HeldOutAgreement(teacher, splits, config.agreement_images)  # warm-up
    times = {}
    start = time.perf_counter()
    heldout = HeldOutAgreement(teacher, splits, config.agreement_images)
    times["set-up"] = time.perf_counter() - start
    start = time.perf_counter()
    heldout.start(student)
    times["start"] = time.perf_counter() - start
    start = time.perf_counter()
    for _ in range(args.evaluations):
        heldout.measure(student)
    times[f"{args.evaluations} evaluations"] = time.perf_counter() - start
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        heldout.picture(student, Path(tmp) / "maps.png")
        times["picture"] = time.perf_counter() - start
    print(f"{len(heldout.images)} held-out images, threads {torch.get_num_threads()}: "
          + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in times.items())
          + f"; total {sum(times.values()):.2f} s")


if __name__ == "__main__":
    main()
