"""Where the GPU step's time goes: the kernels of one Jacobian step (torch.profiler), and the host side
of `jacplug train` (cProfile). Run on a CUDA machine: ``python benchmarks/gpu_profile.py OUT_DIR``
(``--kernels-only``: the first part alone).

Prints (1) the top CUDA kernels of the exact Eq. 10 step, eager, for resnet34 -> resnet18 at 32 px and
resnet50 -> resnet18 at 224 px (bf16 autocast, channels-last, B=64); (2) the functions that take the
host's time in the student phase of `jacplug train --teacher resnet50 --student resnet18`, graphed.
"""

from __future__ import annotations

import cProfile
import pstats
import sys
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

from jacplug.bench import Runner, make_setup


def kernels(config: str, classes: int, size: int) -> None:
    setup = make_setup(config, classes, 64, size, torch.device("cuda"), amp=True, channels_last=True)
    runner = Runner(setup, "eq10-top1")
    for _ in range(5):
        runner()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            runner()
        torch.cuda.synchronize()
    print(f"## {config} C={classes} {size}px, eq10-top1 eager, 3 steps")
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=70))


def host(out: Path) -> None:
    from jacplug.cli.main import main

    run = out / "runs"
    main(["train", "--teacher", "resnet50", "--student", "resnet18", "--out", str(run / "t"), "--epochs", "1"])
    for mode in ("on", "off"):
        profiler = cProfile.Profile()
        profiler.enable()
        main(["train", "--teacher", "resnet50", "--student", "resnet18", "--out", str(run / mode), "--cuda-graphs",
              mode, "--teacher-checkpoint", str(run / "t" / "teacher.safetensors")])
        profiler.disable()
        print(f"## host time of `jacplug train ... --cuda-graphs {mode}` (teacher from a checkpoint)")
        stats = pstats.Stats(profiler)
        stats.sort_stats("cumulative").print_stats(40)
        stats.sort_stats("tottime").print_stats(20)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--kernels-only"]
    out = Path(args[0] if args else "runs/gpu-profile")
    torch.backends.cudnn.benchmark = True
    kernels("resnet34->resnet18", 10, 32)
    kernels("resnet50->resnet18", 1000, 224)
    if "--kernels-only" not in sys.argv:
        host(out)
