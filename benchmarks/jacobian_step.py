"""Step-time and memory ratios of Jacobian-matching methods to a plain KD step (same run).

    python benchmarks/jacobian_step.py                  # = jacplug bench
    python benchmarks/jacobian_step.py --configs resnet34->resnet18:100 --methods projected-k1 full-forum-loop
"""

import argparse
import sys

from jacplug.bench import main_from_args
from jacplug.cli.cmd_bench import add_arguments

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    sys.exit(main_from_args(parser.parse_args()))
