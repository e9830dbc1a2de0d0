"""Step time of the default KD + Jacobian loss with and without the teacher cache (``--cache-teacher``).

Usage: ``python benchmarks/teacher_cache.py [--teacher resnet50] [--student resnet18] [--steps 6]``

Both variants run the step users run (:meth:`jacplug.Distiller.step`: forward, backward,
AdamW step) on the same batches of the embedded digits (16x16), interleaved so that load changes on
a shared machine hit both alike; prints the median step times and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from jacplug import Distiller
from jacplug.losses import jacobian_distillation
from jacplug.training import teacher_cache
from jacplug.data.datasets import few_sample_subset
from jacplug.training.runtime import init_runtime
from jacplug.models.build import build_model
from jacplug.registry import create_dataset


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", default="resnet50")
    parser.add_argument("--student", default="resnet18")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant (after one warm-up each)")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    torch.manual_seed(0)
    runtime = init_runtime(args.device)
    splits = few_sample_subset(create_dataset("digits"), 10, seed=0)
    teacher = build_model("teacher", args.teacher, splits).module.to(runtime.device).eval().requires_grad_(False)
    student = build_model("student", args.student, splits).module.to(runtime.device).train()
    loss = jacobian_distillation()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-3)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cache.safetensors"
        start = time.perf_counter()
        teacher_cache.build_cache(path, teacher, loss, splits.train, runtime, 64, key="bench", show=False)
        build_s = time.perf_counter() - start
        cache = teacher_cache.TeacherCache(path, runtime.device)
        distiller = Distiller(student, teacher, loss, amp=runtime.amp_dtype)
        data = [splits.train[i] for i in range(len(splits.train))]
        times: dict[str, list[float]] = {"live teacher": [], "cached teacher": []}
        for step in range(args.steps + 1):
            index = torch.randperm(len(data))[: args.batch_size]
            x = torch.stack([data[i][0] for i in index]).to(runtime.device)
            y = torch.tensor([data[i][1] for i in index], device=runtime.device)
            for name in times:
                if runtime.device.type == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                cached = cache.lookup(index) if name == "cached teacher" else None
                distiller.step(optimizer, x, y, cached=cached)
                if runtime.device.type == "cuda":
                    torch.cuda.synchronize()
                if step:  # the first round warms up
                    times[name].append(time.perf_counter() - start)
    live, hit = (statistics.median(times[k]) for k in ("live teacher", "cached teacher"))
    print(f"{args.teacher} -> {args.student}, digits 16x16, batch {args.batch_size}, {runtime.device}, "
          f"median of {args.steps} steps")
    print(f"cache build (one pass over {len(splits.train)} samples): {build_s:.2f} s")
    print(f"step without cache: {live * 1000:.0f} ms")
    print(f"step with cache:    {hit * 1000:.0f} ms")
    print(f"ratio (with / without): {hit / live:.2f}")


if __name__ == "__main__":
    main()
