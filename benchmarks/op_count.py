"""How many kernels one training step launches, per method, as a ratio to a KD step (same run).

Why count: an eager GPU step at small batch sizes is bound by the host launching kernels, not by the
kernels, so the number of compute ops a step dispatches predicts its eager GPU time on any machine,
this CPU included. Counted with torch.profiler: leaf aten ops, without views, allocations and
dtype no-ops; per autograd node, the five that dispatch the most.

    python benchmarks/op_count.py                                  # resnet34 -> resnet18, 16 px, B=4
    python benchmarks/op_count.py --config resnet50->resnet18 --methods eq10-top1 eq10-top1-native-bn
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import profile

from jacplug.bench import Runner, make_setup

#: ops that launch no kernel: views, allocation, metadata
NO_KERNEL = {
    "aten::empty", "aten::empty_strided", "aten::empty_like", "aten::as_strided", "aten::view", "aten::reshape",
    "aten::_reshape_alias", "aten::_unsafe_view", "aten::unsqueeze", "aten::squeeze", "aten::unsqueeze_",
    "aten::squeeze_", "aten::expand", "aten::resize_", "aten::detach", "aten::detach_", "aten::alias",
    "aten::lift_fresh", "aten::select", "aten::slice", "aten::t", "aten::permute", "aten::transpose",
    "aten::to", "aten::result_type", "aten::promote_types", "aten::contiguous",
}


def _leaves(event) -> list:
    children = [c for c in event.cpu_children if c.name.startswith("aten::")]
    return [event] if not children else [leaf for c in children for leaf in _leaves(c)]


def _owner(event) -> str:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("autograd::engine::evaluate_function: "):
            return parent.name.split(": ", 1)[1]
        parent = parent.cpu_parent
    return "forward, loss and optimizer"


def count(runner: Runner) -> tuple[int, collections.Counter]:
    """Kernel-launching ops of one step, in all and per autograd node."""
    with profile() as prof:
        runner()
    per_node: collections.Counter = collections.Counter()
    for event in prof.events():
        top_level = event.name.startswith("aten::") and not (event.cpu_parent and event.cpu_parent.name.startswith("aten::"))
        if top_level:
            per_node[_owner(event)] += sum(leaf.name not in NO_KERNEL for leaf in _leaves(event))
    return sum(per_node.values()), per_node


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="resnet34->resnet18")
    parser.add_argument("--methods", nargs="+", default=["eq10-top1", "eq10-top1-native-bn", "direction-fd"])
    parser.add_argument("--classes", type=int, default=10)
    args = parser.parse_args()
    setup = make_setup(args.config, args.classes, batch=4, size=16, device=torch.device("cpu"))
    print(f"# kernel-launching ops per training step, {setup.name}, B=4 (the count does not depend on B)")
    totals = {}
    for method in ["kd", *args.methods]:
        runner = Runner(setup, method)
        runner()  # first step: lazy initialisation
        totals[method], per_node = count(runner)
        top = ", ".join(f"{node} {n}" for node, n in per_node.most_common(5))
        print(f"{method:<22} {totals[method]:>6} ops  {totals[method] / totals['kd']:5.2f}x KD   ({top})")


if __name__ == "__main__":
    main()
