"""The default preset's weight, chosen on validation runs of the default command's own models and data.

``jacplug train --teacher resnet50 --student resnet18`` (no ``--loss``) trains with the preset
``kd=0.5 + jacobian=0.5 * lambda`` on the embedded digits for 4 epochs of batch 64 (80 steps). This
script trains the same teacher (4 epochs) and runs that student phase for lambda in {0.3, 1, 3, 10, 30}
with 3 selection seeds, scored on the validation split only; then KD alone and the preset at the
chosen lambda with 5 further seeds, scored on the test split.

Usage: ``python benchmarks/default_weight.py [--out runs/default-weight] [jacplug experiment options]``;
any option given here replaces the protocol's. The published run is docs/results.md.
"""

from __future__ import annotations

import sys

from jacplug.cli.main import main

PROTOCOL = [
    "--teacher", "resnet50", "--teacher-epochs", "4", "--student", "resnet18",
    "--methods", "kd", "preset", "--samples-per-class", "all", "--seeds", "5",
    "--steps", "80", "--batch-size", "64",
    "--select-at", "all", "--select-seeds", "3", "--jacobian-weights", "0.3", "1", "3", "10", "30",
    "--out", "runs/default-weight",
]

if __name__ == "__main__":
    raise SystemExit(main(["experiment", *PROTOCOL, *sys.argv[1:]]))
