"""Step-time and memory ratios of Jacobian-matching methods to a plain KD step (same run).

    python benchmarks/jacobian_step.py                  # = jacplug bench
    python benchmarks/jacobian_step.py --configs resnet34->resnet18:100 --methods projected-k1 full-forum-loop
"""

import sys

from jacplug.cli.main import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
