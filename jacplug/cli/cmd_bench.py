"""``jacplug bench``: the Jacobian step benchmark (same as benchmarks/jacobian_step.py).

The flags are made from :class:`jacplug.bench.BenchConfig`'s fields (torch-free), so building the CLI
parser stays fast; the measuring code is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import json
import os

from .. import bench
from ..bench import DEFAULT_CONFIGS, DEFAULT_CUDA_CONFIGS, BenchConfig
from ..config_fields import add_options, given_flags, read_options
from ..errors import UserError
from ..io.files import atomic_write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_options(parser, BenchConfig)
    parser.add_argument("--config", metavar="FILE", help="YAML, TOML or JSON file with any of these options; flags win")


def add_parser(sub) -> None:
    p = sub.add_parser("bench", help="measure Jacobian-matching step cost as ratios to a plain KD step")
    add_arguments(p)
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Check every option, measure (:func:`jacplug.bench.run`), print the table, write the JSON."""
    import torch  # start-up time: building the parser must not load torch

    file_values = read_options(BenchConfig, args.config) if args.config else {}
    args = BenchConfig(**{**file_values, **given_flags(BenchConfig, args)})
    for option, value, least in (("--repeats", args.repeats, 1), ("--full-repeats", args.full_repeats, 1),
                                 ("--batch-size", args.batch_size, 2), ("--image-size", args.image_size, 1),
                                 ("--threads", args.threads, 1)):
        if value is not None and value < least:
            why = " (train-mode BatchNorm needs two samples)" if option == "--batch-size" else ""
            raise UserError(f"{option} must be at least {least}{why}, got {value}")
    if args.json:
        _check_writable(args.json)  # before measuring: the results would be lost after minutes of work
    if args.threads:
        torch.set_num_threads(args.threads)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise UserError("--device cuda: CUDA is not available on this machine; use --device cpu")
    if (args.amp or args.channels_last or args.cuda_graphs) and not cuda:
        raise UserError("--amp, --channels-last and --cuda-graphs measure the GPU step; add --device cuda")
    specs = args.configs or (DEFAULT_CUDA_CONFIGS if cuda else DEFAULT_CONFIGS)
    configs = [bench.parse_config(spec, args.image_size) for spec in specs]
    device = torch.device(args.device)
    if cuda:
        torch.backends.cudnn.benchmark = True  # static shapes: time cuDNN's algorithms once
    card = f" ({torch.cuda.get_device_name(device)})" if cuda else ""
    print(f"# jacplug bench: torch {torch.__version__}, device {device}{card}, threads {torch.get_num_threads()}, "
          f"batch {args.batch_size}, {args.repeats} rounds, amp {'bf16' if args.amp else 'off'}, channels-last "
          f"{'on' if args.channels_last else 'off'}, memory: {'peak allocated' if cuda else args.memory}")
    print(run_length(configs, args))
    print(method_legend(configs, args))
    rows = bench.run(configs, args.methods, args.repeats, args.full_repeats, args.batch_size, device,
                     memory_mode=args.memory, amp=args.amp, channels_last=args.channels_last, graphs=args.cuda_graphs)
    print(bench.format_table(rows))
    if args.json:
        atomic_write_text(args.json, json.dumps({"device": card.strip(" ()") or "cpu", "torch": torch.__version__,
                                                 "rows": rows}, indent=2))
    return 0


def run_length(configs: list[tuple[str, int, int]], args: BenchConfig) -> str:
    """How long the run is, printed before it starts: configs x rounds, the steps of a round, the warm-up."""
    steps = [bench.variants(classes, args.methods, args.cuda_graphs) for _, classes, _ in configs]
    timed = sum(min(args.full_repeats, args.repeats) if method.startswith("full-") else args.repeats
                for measured in steps for method, _ in measured)
    fresh = " and a fresh process per step for its memory" if args.memory == "rss" and args.device == "cpu" else ""
    return (f"# length: {len(configs)} configs x {args.repeats} rounds of their methods' steps "
            f"({' + '.join(str(len(m)) for m in steps)}{', eager and graphed' if args.cuda_graphs else ''}; full-* in "
            f"{min(args.full_repeats, args.repeats)} round(s)) = {timed} timed steps, after "
            f"{4 if args.cuda_graphs else 1} warm-up step(s) each{fresh}")


def method_legend(configs: list[tuple[str, int, int]], args: BenchConfig) -> str:
    """One line on each method the run measures (ratios are to ``kd``'s eager step of the same config)."""
    measured = dict.fromkeys(m for _, classes, _ in configs for m, _ in bench.variants(classes, args.methods, False))
    width = max(map(len, measured))
    return "\n".join(f"#   {name:<{width}}  {bench.METHODS[name]}" for name in measured)


def _check_writable(path: str) -> None:
    """Open ``path`` for appending (and remove it again when it did not exist): the one check that
    also holds for root, for whom permission bits say nothing. A symbolic link is refused first: opening it
    would create or touch its target, and the rows are never written through a link."""
    if os.path.islink(path):
        raise UserError(f"--json {path!r} is a symbolic link; rows are never written through a link: "
                        "give the file's own path or a new one")
    existed = os.path.exists(path)
    try:
        with open(path, "a"):
            pass
    except OSError as exc:
        raise UserError(f"--json {path!r} cannot be written ({exc.strerror}); choose another path") from None
    if not existed:
        os.remove(path)
