"""Few-sample distillation experiment: CE, KD, KD + Jacobian (Eq. 10), KD + projected
Jacobian, KD + attention, KD + attention + Jacobian, at 1/5/10/50/all samples per class.

Usage: ``python benchmarks/few_shot.py [--out runs/few-shot] [options]``, the same as
``jacplug experiment`` (``--help`` lists the options). The published run is docs/results.md.
"""

from __future__ import annotations

import sys

from jacplug.cli.main import main

if __name__ == "__main__":
    raise SystemExit(main(["experiment", *sys.argv[1:]]))
