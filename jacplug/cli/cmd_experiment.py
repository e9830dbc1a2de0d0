"""``jacplug experiment``: the few-sample distillation experiment (same as benchmarks/few_shot.py).

Argument definitions live here, free of torch, so building the CLI parser stays fast; the experiment
is :mod:`jacplug.experiment`, imported only when the command runs.
"""

from __future__ import annotations

import argparse

from ..errors import UserError

#: must equal the keys of jacplug.experiment.methods.METHODS (a test checks it)
METHOD_NAMES = ("ce", "kd", "kd+jacobian", "kd+projected", "kd+attention", "kd+attention+jacobian")


def sample_size(text: str) -> int | None:
    """``"all"`` -> ``None`` (every training image), else a positive integer."""
    if text.strip().lower() == "all":
        return None
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer or 'all', got {text!r}")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("data and models")
    d.add_argument("--dataset", default="digits", help="digits (embedded), cifar10, cifar100, ... (default: %(default)s)")
    d.add_argument("--data-root", default=None, help="where torchvision datasets live (default: data)")
    d.add_argument("--download", action="store_true", help="download the dataset (needs internet)")
    d.add_argument("--image-size", type=int, default=None, help="default: the dataset's (digits 16, CIFAR 32)")
    d.add_argument("--teacher", default="resnet10t", help="any timm name (default: %(default)s)")
    d.add_argument("--student", default="test_resnet", help="any timm name (default: %(default)s)")
    d.add_argument("--teacher-checkpoint", default=None, help="teacher weights (safetensors) instead of training one")
    d.add_argument("--teacher-epochs", type=int, default=10)
    g = p.add_argument_group("grid")
    g.add_argument("--samples-per-class", type=sample_size, nargs="+", default=[1, 5, 10, 50, None], metavar="N",
                   help="student training images per class; 'all' = the whole split (default: 1 5 10 50 all)")
    g.add_argument("--methods", nargs="+", choices=METHOD_NAMES, default=list(METHOD_NAMES), metavar="METHOD",
                   help="default: all of " + ", ".join(METHOD_NAMES))
    g.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per cell (default: %(default)s)")
    g.add_argument("--steps", type=int, default=100, help="optimisation steps per student run (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--temperature", type=float, default=4.0, help="KD temperature (default: %(default)s)")
    g.add_argument("--attention-layers", default="layer1+layer2", help="attention transfer layers (same names in both)")
    s = p.add_argument_group("selection on the validation split")
    s.add_argument("--jacobian-weights", type=float, nargs="+", default=[1.0, 10.0, 30.0], metavar="W",
                   help="grid for the Jacobian and projected-Jacobian weights (default: 1 10 30)")
    s.add_argument("--attention-weights", type=float, nargs="+", default=[1.0, 10.0, 30.0], metavar="W",
                   help="grid for the attention weight (default: 1 10 30)")
    s.add_argument("--select-at", type=sample_size, nargs="+", default=[5, 50], metavar="N",
                   help="sample sizes at which weights are chosen, one seed each (default: 5 50)")
    r = p.add_argument_group("execution")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    r.add_argument("--workers", type=int, default=2, help="processes on CPU (default: %(default)s; GPU: one)")
    r.add_argument("--threads", type=int, default=1, help="torch threads per process (default: %(default)s)")
    r.add_argument("--out", default="runs/few-shot", help="output directory (default: %(default)s)")


def add_parser(sub) -> None:
    p = sub.add_parser("experiment", help="few-sample distillation experiment: CE, KD, +Jacobian, +attention")
    add_arguments(p)
    p.set_defaults(run=run)


def config_from_args(args: argparse.Namespace):
    from ..experiment import ExperimentConfig

    if args.seeds <= 0:
        raise UserError(f"--seeds must be a positive integer, got {args.seeds}")
    return ExperimentConfig(
        dataset=args.dataset, data_root=args.data_root, download=args.download, image_size=args.image_size,
        teacher=args.teacher, student=args.student, teacher_checkpoint=args.teacher_checkpoint,
        teacher_epochs=args.teacher_epochs, samples_per_class=list(args.samples_per_class),
        methods=list(args.methods), seeds=list(range(args.seeds)), steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, temperature=args.temperature, attention_layers=args.attention_layers,
        jacobian_grid=list(args.jacobian_weights), attention_grid=list(args.attention_weights),
        select_at=list(args.select_at), device=args.device, workers=args.workers, threads=args.threads,
        out=args.out,
    )


def run(args: argparse.Namespace) -> int:
    from ..experiment import run_experiment

    run_experiment(config_from_args(args))
    return 0
