"""``jacplug experiment``: the distillation experiments behind docs/results.md (benchmarks/*.py wrap it).

Argument definitions live here, free of torch, so building the CLI parser stays fast; the experiment
is :mod:`jacplug.experiment`, imported only when the command runs. ``--config FILE`` (YAML, TOML or
JSON, the option names with dashes or underscores) sets any option; flags given on the command line win.
"""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import UserError, close_matches

#: must equal the keys of jacplug.experiment.methods.METHODS (a test checks it)
METHOD_NAMES = ("ce", "kd", "kd+jacobian", "kd+projected", "kd+attention", "kd+attention+jacobian", "kd+noisy",
                "kd+noisy-jacobian", "preset")
#: the default --methods, equal to jacplug.experiment.methods.FEW_SHOT_METHODS (a test checks it)
FEW_SHOT_METHODS = METHOD_NAMES[:6]


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
    d.add_argument("--student-kwargs", default=None, metavar="KEY=VALUE,...",
                   help="student constructor kwargs, e.g. patch_size=4 for a ViT (img_size is set automatically)")
    d.add_argument("--teacher-checkpoint", default=None, help="teacher weights (safetensors) instead of training one")
    d.add_argument("--teacher-epochs", type=int, default=10)
    g = p.add_argument_group("grid")
    g.add_argument("--samples-per-class", type=sample_size, nargs="+", default=[1, 5, 10, 50, None], metavar="N",
                   help="student training images per class; 'all' = the whole split (default: 1 5 10 50 all)")
    g.add_argument("--methods", nargs="+", choices=METHOD_NAMES, default=list(FEW_SHOT_METHODS), metavar="METHOD",
                   help=f"any of {', '.join(METHOD_NAMES)} (default: {' '.join(FEW_SHOT_METHODS)})")
    g.add_argument("--seeds", type=int, default=5, help="seeds 0..N-1 per cell (default: %(default)s)")
    g.add_argument("--steps", type=int, default=100, help="optimisation steps per student run (default: %(default)s)")
    g.add_argument("--batch-size", type=int, default=32)
    g.add_argument("--lr", type=float, default=2e-3)
    g.add_argument("--temperature", type=float, default=4.0, help="KD temperature (default: %(default)s)")
    g.add_argument("--attention-layers", default="layer1+layer2", help="attention transfer layers (same names in both)")
    s = p.add_argument_group("selection on the validation split")
    s.add_argument("--jacobian-weights", type=float, nargs="+", default=[0.1, 0.3, 1.0, 3.0, 10.0], metavar="W",
                   help="grid for the Jacobian, projected-Jacobian and preset weights (default: 0.1 0.3 1 3 10)")
    s.add_argument("--attention-weights", type=float, nargs="+", default=[1.0, 10.0, 30.0], metavar="W",
                   help="grid for the attention weight (default: 1 10 30)")
    s.add_argument("--noisy-weights", type=float, nargs="+", default=[0.01, 0.1, 1.0], metavar="W",
                   help="grid for the noisy-input distillation weight (default: 0.01 0.1 1)")
    s.add_argument("--noisy-sigma", type=float, default=0.2,
                   help="training noise of kd+noisy, in units of the pixel std (default: %(default)s)")
    s.add_argument("--select-at", type=sample_size, nargs="+", default=[5, 50], metavar="N",
                   help="sample sizes at which weights are chosen (default: 5 50)")
    s.add_argument("--select-seeds", type=int, default=1,
                   help="seeds 1000..1000+N-1 per grid point; the best mean wins (default: %(default)s)")
    s.add_argument("--select-on", choices=("clean", "noise"), default="clean",
                   help="validation score: clean accuracy, or mean accuracy over --noise-sigmas (default: clean)")
    n = p.add_argument_group("robustness")
    n.add_argument("--noise-sigmas", type=float, nargs="+", default=[], metavar="SIGMA",
                   help="also score val/test accuracy with additive Gaussian input noise of these std "
                        "(units of the pixel std; 0 = clean); writes noise.png")
    r = p.add_argument_group("execution")
    r.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N (default: %(default)s)")
    r.add_argument("--workers", type=int, default=2, help="processes on CPU (default: %(default)s; GPU: one)")
    r.add_argument("--threads", type=int, default=1, help="torch threads per process (default: %(default)s)")
    r.add_argument("--loader-workers", type=int, default=None,
                   help="processes loading training batches in each run (default: 0 on CPU, 4 on CUDA)")
    r.add_argument("--out", default="runs/few-shot", help="output directory (default: %(default)s)")
    p.add_argument("--config", metavar="FILE", help="YAML, TOML or JSON file with any of these options; flags win")


def add_parser(sub) -> None:
    p = sub.add_parser("experiment", help="distillation experiments: few samples, input noise, a default weight")
    add_arguments(p)
    p.set_defaults(run=run)


def with_config_file(args: argparse.Namespace, argv: list[str]) -> argparse.Namespace:
    """``args`` with the options of ``args.config`` as defaults: ``argv`` (the experiment's own
    arguments) is parsed again into a namespace that already holds the file's values, so argparse
    keeps a file value unless the flag is given. Values are checked with the flag's own type."""
    from ..pipeline.config import read_mapping

    from .parser import Parser

    parser = Parser(prog="jacplug experiment")
    add_arguments(parser)
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    namespace = argparse.Namespace()
    for key, value in read_mapping(args.config).items():
        dest = str(key).replace("-", "_")
        if dest not in actions:
            near = close_matches(dest.replace("_", "-"), [d.replace("_", "-") for d in actions])
            hint = f"; did you mean {', '.join(near)}?" if near else ""
            raise UserError(f"config file {args.config!r}: unknown option {key!r}{hint}")
        setattr(namespace, dest, _file_value(actions[dest], value, args.config))
    return parser.parse_args(argv, namespace=namespace)


def _file_value(action: argparse.Action, value: Any, path: str) -> Any:
    """A config-file value converted as its flag would convert the same text, with a one-line error."""
    where = f"config file {path!r}: option {action.dest.replace('_', '-')!r}"
    if isinstance(action, argparse._StoreTrueAction):
        if not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {value!r}")
        return value
    if action.nargs == "+":
        items = value if isinstance(value, list) else [value]
        if not items:
            raise UserError(f"{where} needs at least one value")
        return [_one_value(action, item, where) for item in items]
    return _one_value(action, value, where)


def _one_value(action: argparse.Action, value: Any, where: str) -> Any:
    if action.type is None:  # text, or a kwargs mapping
        converted = value if value is None or isinstance(value, (str, dict)) else str(value)
    else:
        try:
            converted = action.type(str(value))
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise UserError(f"{where}: {exc}") from None
    if action.choices is not None and converted not in action.choices:
        raise UserError(f"{where}: {value!r} is not one of {', '.join(map(str, action.choices))}")
    return converted


def config_from_args(args: argparse.Namespace):
    from ..experiment import ExperimentConfig
    from ..pipeline.model_options import kwargs_option

    for name in ("seeds", "select_seeds"):
        if getattr(args, name) <= 0:
            raise UserError(f"--{name.replace('_', '-')} must be a positive integer, got {getattr(args, name)}")
    return ExperimentConfig(
        dataset=args.dataset, data_root=args.data_root, download=args.download, image_size=args.image_size,
        teacher=args.teacher, student=args.student,
        student_kwargs=kwargs_option(args.student_kwargs, "--student-kwargs"),
        teacher_checkpoint=args.teacher_checkpoint,
        teacher_epochs=args.teacher_epochs, samples_per_class=list(args.samples_per_class),
        methods=list(args.methods), seeds=list(range(args.seeds)), steps=args.steps, batch_size=args.batch_size,
        lr=args.lr, temperature=args.temperature, attention_layers=args.attention_layers,
        jacobian_grid=list(args.jacobian_weights), attention_grid=list(args.attention_weights),
        noisy_grid=list(args.noisy_weights), noisy_sigma=args.noisy_sigma,
        select_at=list(args.select_at), select_seeds=[1000 + i for i in range(args.select_seeds)],
        select_on=args.select_on, noise_sigmas=list(args.noise_sigmas),
        device=args.device, workers=args.workers, threads=args.threads, loader_workers=args.loader_workers,
        out=args.out,
    )


def run(args: argparse.Namespace) -> int:
    from ..experiment import run_experiment

    if args.config:
        args = with_config_file(args, args.argv)
    run_experiment(config_from_args(args))
    return 0
