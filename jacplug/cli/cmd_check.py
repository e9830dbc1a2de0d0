"""``jacplug check``: run one batch through the loss and show whether each term reaches the student.

It is the start-up probe of ``jacplug train`` (:meth:`jacplug.Distiller.check`) on a batch of ``--batch-size``: an op the student
cannot differentiate as a term needs ends it with one line naming the op, the module and the terms
that work instead (exit code 2).

The teacher is untrained unless ``--teacher-checkpoint`` is given (gradient flow does not depend on
its weights). Prints the per-term table of :func:`jacplug.checks.gradient_flow.format_flow_table`; a term with
no path to the student's (or adapters') parameters ends the command with exit code 2.
"""

from __future__ import annotations

import argparse

from ..training.config import resolve


def add_parser(sub) -> None:
    p = sub.add_parser("check", help="check on one batch that every loss term trains the student")
    p.add_argument("--teacher", default="resnet50", metavar="NAME[:KEY=VALUE,...]",
                   help="teacher model name (default resnet50), optionally with constructor kwargs")
    p.add_argument("--student", default="resnet18", metavar="NAME[:KEY=VALUE,...]",
                   help="student model name (default resnet18), optionally with constructor kwargs")
    p.add_argument("--teacher-kwargs", metavar="KEY=VALUE,...", help="keyword arguments for the teacher's constructor")
    p.add_argument("--student-kwargs", metavar="KEY=VALUE,...", help="keyword arguments for the student's constructor")
    p.add_argument("--loss", action="append", metavar="NAME=WEIGHT[:KEY=VALUE,...]",
                   help="a loss term, its weight and its options, repeatable (default: the KD + Jacobian preset); "
                        "the names: `jacplug plugins`, the form: docs/pipeline.md, Specs")
    p.add_argument("--dataset", default="digits", help="dataset for the batch (default: the embedded digits)")
    p.add_argument("--data-root", help="where torchvision datasets live")
    p.add_argument("--image-size", type=int, help="input size (dataset default when omitted)")
    p.add_argument("--batch-size", type=int, default=8, help="images in the batch (default 8)")
    p.add_argument("--teacher-checkpoint", metavar="PATH", help="teacher weights (.safetensors)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu (default), cuda or auto")
    p.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    # start-up time: torch, timm and the pipeline load only when the command runs, not to build the parser
    import torch

    from ..checks.gradient_flow import format_flow_table, raise_for_detached
    from ..io.checkpoint import load_weights
    from ..training.runtime import init_runtime
    from ..models.build import build_model
    from ..training.prepare import loss_for_pair, check_step, load_data
    from ..training.teacher import build_teacher

    config = resolve({}, dict(
        teacher=args.teacher, student=args.student, teacher_kwargs=args.teacher_kwargs,
        student_kwargs=args.student_kwargs, loss=args.loss or [], dataset=args.dataset, data_root=args.data_root,
        image_size=args.image_size, batch_size=args.batch_size, seed=args.seed, device=args.device, augment=False,
        teacher_checkpoint=args.teacher_checkpoint,
    ))
    torch.manual_seed(config.seed)
    runtime = init_runtime(config.device)
    splits = load_data(config)
    loss = loss_for_pair(config.loss, config.teacher, config.student).to(runtime.device)
    student = build_model("student", config.student, splits, config.student_kwargs).module.to(runtime.device).train()
    built = build_teacher(config, splits)
    if args.teacher_checkpoint:
        load_weights(args.teacher_checkpoint, built.module, expected_name=config.teacher, num_classes=splits.num_classes,
                   in_chans=splits.in_chans, model_kwargs=built.kwargs)
    teacher = built.module.to(runtime.device).eval().requires_grad_(False)
    generator = torch.Generator().manual_seed(config.seed)
    picks = torch.randperm(len(splits.train), generator=generator)[: config.batch_size].tolist()
    inputs = torch.stack([splits.train[i][0] for i in picks]).to(runtime.device)
    targets = torch.tensor([int(splits.train[i][1]) for i in picks], device=runtime.device)
    report = check_step(student, teacher, loss, inputs, targets, runtime, name=config.student, require_flow=False)
    print(f"{config.teacher} -> {config.student} on {config.dataset}, one batch of {len(picks)}:")
    print(format_flow_table(report, loss.weights))
    raise_for_detached(report)
    return 0
