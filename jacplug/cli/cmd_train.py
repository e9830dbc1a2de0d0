"""``jacplug train``: distil a teacher into a student and print a summary table.

Every option defaults to ``None`` here so the pipeline can tell what the user gave: defaults come
from :class:`jacplug.training.config.TrainConfig`, then ``--config FILE``, then these flags.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

from ..config_fields import add_options
from ..errors import UserError
from ..specs import merge_options
from ..training.config import FIELDS, TrainConfig, for_resume, read_config_file, resolve, resume_mode, saved_run


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="distil a teacher into a student (KD + Jacobian matching by default)",
        description="Distil a teacher into a student. Without data options it uses the embedded digits "
        "dataset; without a teacher checkpoint it trains the teacher first. Options may also come from "
        "--config FILE (YAML, TOML or JSON, same names); flags given here override the file. Loss, model "
        "and observer specs (NAME:KEY=VALUE,...): docs/pipeline.md; loss and observer names: jacplug plugins.",
    )
    add_options(p, TrainConfig)
    p.add_argument("--config", metavar="FILE", help="YAML, TOML or JSON file with any of these options (same names)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")
    p.set_defaults(run=run)


def resolve_config(args: argparse.Namespace):
    """The run's :class:`TrainConfig`: the saved config when resuming, else defaults < file < flags.

    ``--resume auto`` resumes when ``--out`` holds a run (its ``config.json``) and starts one when it
    holds none; a run of another configuration there is refused like ``--resume`` refuses it."""
    given = {k: v for k, v in vars(args).items() if k in FIELDS and k != "resume"}
    file_options = read_config_file(args.config) if args.config else {}
    mode = resume_mode(args.resume if args.resume is not None else file_options.pop("resume", False))
    file_options.pop("resume", None)
    if not mode:
        return resolve(file_options, given)
    flag = "--resume auto" if mode == "auto" else "--resume"
    out = given.get("out") or file_options.get("out")
    if not out:
        raise UserError(f"{flag} needs --out DIR, the directory of the run to continue")
    saved = saved_run(out)
    if saved is None:
        if mode == "auto":
            return resolve(file_options, given)  # nothing to continue yet: this is the run's first start
        raise UserError(f"--resume: {str(out)!r} holds no run (no config.json); pass the run's directory as --out, "
                        "or --resume auto to start it when there is none")
    return for_resume(saved, merge_options(file_options, given), str(out), flag=flag)


def lost_peer(error: BaseException) -> str | None:
    """One line for a torchrun worker whose collective failed because another worker died (killed,
    out of memory, its machine gone), or ``None`` for any other error.

    Gloo and NCCL report a lost peer as a ``RuntimeError`` (``DistBackendError``) whose text names the
    connection that broke, not the rank; with two workers the peer is the other one."""
    world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    if world < 2 or not isinstance(error, RuntimeError):
        return None
    text = " ".join(str(error).split())
    found = re.search(r"(connection (closed|reset) by peer|broken pipe|socket timeout|timed out|econnreset|"
                      r"connection refused|nccl communicator was aborted|remote process exited)", text, re.I)
    if not found:
        return None
    address = re.search(r"\[?(\d{1,3}(?:\.\d{1,3}){3}\]?:\d+)", text)
    peer = f"rank {1 - rank}" if world == 2 else "a peer rank"
    where = f" at {address.group(1).replace(']', '')}" if address else ""
    from ..training.runtime import UNSHARED_STORE

    line = (f"rank {rank} of {world} lost {peer}{where} in a collective ({found.group(1)}); torchrun restarts "
            "the workers if --max-restarts allows, and with --resume auto they continue from the last save")
    if int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0) and os.environ.get(UNSHARED_STORE) != "1":
        line += (f" (this worker was itself restarted: if its peers are unreachable after every restart, run torchrun "
                 f"with {UNSHARED_STORE}=1)")
    return line


def format_summary(summary: dict) -> str:
    """The end-of-run table: accuracies, final per-term losses, time, checkpoint paths."""

    def pct(value) -> str:
        return "-" if value is None else f"{100 * value:.2f}%"

    passes = summary["images_seen"] / summary["train_samples"]
    rows = [
        ("teacher", f"{summary['teacher']} ({summary['teacher_source']})"),
        ("student", f"{summary['student']} on {summary['dataset']}, {summary['train_samples']:,} training images"),
        ("student training", f"{summary['optimizer_steps']:,} optimizer steps x {summary['batch']} images = "
                             f"{summary['images_seen']:,} images seen ({passes:.1f} passes, {summary['epochs']} epochs)"),
        ("teacher test accuracy", pct(summary["teacher_test_acc"])),
        ("student test accuracy (last)", pct(summary["student_last_test_acc"])),
        (f"student test accuracy (best on {summary['best_chosen_on']}, step {summary['student_best_step']}, "
         f"epoch {summary['student_best_epoch']})", pct(summary["student_best_test_acc"])),
    ]
    if summary["best_chosen_on"] == "test":
        rows.append(("note", "no validation split: the best epoch was chosen on the test split, so its accuracy "
                             "is optimistic; the last epoch's is the unbiased one"))
    if summary.get("dropped_images"):
        dropped = summary["dropped_images"]
        rows.append(("unreadable images dropped", f"{len(dropped)} (listed in config.json; first: {dropped[0]})"))
    rows += [(f"final loss: {k}", f"{v:.4g}") for k, v in summary["final_losses"].items()]
    agreement = summary.get("agreement") or {}
    if "agreement_cosine" in agreement:
        rows.append(("held-out gradient agreement (cosine)", f"{agreement['agreement_cosine']:.3f}  (1: the teacher's "
                                                             "input gradients; see gradient_maps.png)"))
        rows.append(("held-out gradient distance (Eq. 10)", f"{agreement['agreement_distance']:.4g}"))
    from ..training.plan import WARMUP_STEPS  # start-up time: the plan module loads torch

    too_short = f"not measured: the first {WARMUP_STEPS} steps are warm-up, and the phase was not longer"
    if summary.get("teacher_images_per_s"):
        rows.append(("teacher training speed", f"{summary['teacher_images_per_s']:.0f} images/s after warm-up"))
    elif "trained here" in str(summary.get("teacher_source")):
        rows.append(("teacher training speed", too_short))
    # "student_steps_run" is the key's spelling in summaries saved (--json) before it named a count elsewhere
    step_mode = summary.get("student_step_mode", summary.get("student_steps_run"))
    if summary.get("student_images_per_s"):
        rows.append(("student training speed", f"{summary['student_images_per_s']:.0f} images/s after warm-up "
                                               f"({step_mode})"))
    else:
        rows.append(("student training speed", f"{too_short} ({step_mode})"))
    minutes, seconds = divmod(summary["time_s"], 60)
    rows.append(("time", f"{int(minutes)}m {seconds:.1f}s"))
    rows += [(f"checkpoint: {k}", v) for k, v in summary["checkpoints"].items()]
    if summary.get("plot"):
        rows.append(("plot", summary["plot"]))
    if summary.get("gradient_maps"):
        rows.append(("gradient maps", summary["gradient_maps"]))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)


def run(args: argparse.Namespace) -> int:
    from ..commands.train_run import train  # start-up time: torch, timm and the whole pipeline

    config = resolve_config(args)
    try:
        summary = train(config)
    except RuntimeError as error:
        line = lost_peer(error)
        if line is None:
            raise
        print(f"jacplug: {line}", file=sys.stderr, flush=True)
        return 1
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0
