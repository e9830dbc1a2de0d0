"""Robustness to input noise: does Jacobian matching give the student the teacher's robustness, and
does it act like distillation on noisy inputs (Srinivas & Fleuret 2018: to first order in sigma,
matching outputs on ``x + sigma * z`` is output matching plus ``sigma^2`` times Jacobian matching)?

CE, KD, KD + Jacobian (Eq. 10), KD + projected all-class matching, KD + noisy-input distillation
(training noise sigma 0.2) and KD + its first-order Jacobian term alone (the unnormalised Frobenius
distance at weight ``w * sigma^2``, with the weight ``w`` chosen for noisy distillation) are trained
on the embedded digits with 10 and with all images per class (5 seeds). Each is scored on the test
split with additive Gaussian noise of several sigma (units of the pixel std), beside the teacher.
Each weight is chosen on the validation split by the mean accuracy over the same noise levels.

Usage: ``python benchmarks/noise_robustness.py [--out runs/noise] [jacplug experiment options]``; any
option given here replaces the protocol's. The published run is docs/results.md.
"""

from __future__ import annotations

import sys

from jacplug.cli.main import main

PROTOCOL = [
    "--methods", "ce", "kd", "kd+jacobian", "kd+projected", "kd+noisy", "kd+noisy-jacobian",
    "--samples-per-class", "10", "all", "--seeds", "5",
    "--noise-sigmas", "0", "0.1", "0.2", "0.3", "0.4", "0.5",
    "--select-on", "noise", "--select-at", "10", "all", "--select-seeds", "2",
    "--jacobian-weights", "0.1", "0.3", "1", "3", "10", "--noisy-weights", "0.01", "0.1", "1", "--noisy-sigma", "0.2",
    "--out", "runs/noise",
]

if __name__ == "__main__":
    raise SystemExit(main(["experiment", *PROTOCOL, *sys.argv[1:]]))
