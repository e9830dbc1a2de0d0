"""Where a run executes: device choice, mixed precision, and the torchrun process group.

``--device auto`` picks CUDA when available. On CUDA the student's forward runs under bf16 autocast
and models use channels-last memory (both speed up convolutions on tensor cores); on CPU neither is
used (bf16 convolutions are slower than float32 on most CPUs). Jacobian terms stay correct under
autocast because the loss terms are evaluated outside the autocast region with logits cast
to float32 (see :class:`jacplug.Distiller`); the double backward through the bf16
forward still runs in the precision autocast chose for each op.

Distributed: under ``torchrun`` (``WORLD_SIZE`` > 1) :func:`init_runtime` joins the process
group (NCCL on CUDA, gloo on CPU) and pins each rank to ``cuda:LOCAL_RANK``. DDP keeps the student's
replicas in sync; the loss terms' own parameters (FitNet adapters) live outside the DDP module, so
:class:`jacplug.Distiller` broadcasts them and averages their gradients, as DDP does for the student.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from dataclasses import dataclass
import torch
import torch.distributed as dist
from torch import nn

from ..errors import UserError
from .config import check_device


@dataclass(frozen=True)
class Runtime:
    """The resolved device and process layout. ``rank 0`` writes files and calls lifecycle hooks."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    amp_dtype: torch.dtype | None = None  # autocast dtype for the models' forward passes; None: float32
    channels_last: bool = False

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """Context for the models' forward passes (a no-op when ``amp_dtype`` is None, as on CPU)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        # autocast's cache of cast weights must not outlive a CUDA-graph capture (PyTorch's rule)
        capturing = self.device.type == "cuda" and torch.cuda.is_current_stream_capturing()
        return torch.autocast(self.device.type, dtype=self.amp_dtype, cache_enabled=not capturing)


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else CPU; ``cuda`` without CUDA is an error,
    and so is any other name (``tpu`` would otherwise run on the CPU and record "tpu")."""
    check_device(requested)
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UserError("--device cuda was requested but CUDA is not available here; use --device cpu or auto")
        return torch.device(requested if ":" in requested else f"cuda:{local_rank}")
    return torch.device("cpu")


def init_runtime(requested: str) -> Runtime:
    """Resolve the device and, under torchrun, join the process group."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = resolve_device(requested, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        # every step has the same shapes (a last, smaller batch excepted): let cuDNN time its algorithms once
        torch.backends.cudnn.benchmark = True
    if world_size > 1 and not dist.is_initialized():
        _join("nccl" if device.type == "cuda" else "gloo", rank, world_size)
    cuda = device.type == "cuda"
    return Runtime(
        device=device,
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        amp_dtype=torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else None,
        channels_last=cuda,
    )


#: torchrun's setting that gives each round of restarted workers a rendezvous store of its own
UNSHARED_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE"


def _join(backend: str, rank: int, world_size: int) -> None:
    """Join torchrun's process group; a restarted worker that cannot reach its peers is one line naming
    :data:`UNSHARED_STORE`.

    Why: torchrun's elastic agent shares its TCP store with the workers it starts, and after a restart
    the store still holds the dead workers' addresses, which the new workers may read and connect to
    (torch 2.14, gloo); the setting makes every round use a store of its own (docs/pipeline.md, Multi-node)."""
    try:
        dist.init_process_group(backend)
    except RuntimeError as error:  # DistNetworkError, DistStoreError, DistBackendError
        restarts = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") or 0)
        if restarts == 0 or os.environ.get(UNSHARED_STORE) == "1":
            raise
        reason = " ".join(str(error).split())[:200]
        raise UserError(f"rank {rank} of {world_size}, restarted by torchrun ({restarts}), could not reach its peers "
                        f"({reason}); restarted workers may read the dead workers' addresses from the store torchrun "
                        f"shares with them: run torchrun with {UNSHARED_STORE}=1 in its environment") from None


def shutdown(runtime: Runtime) -> None:
    if runtime.distributed and dist.is_initialized():
        dist.destroy_process_group()


def barrier(runtime: Runtime) -> None:
    if runtime.distributed:
        dist.barrier()


def distribute(student: nn.Module, runtime: Runtime) -> nn.Module:
    """The student the training step calls: ``student`` itself, or under torchrun ``student`` wrapped in
    ``DistributedDataParallel`` (the :class:`jacplug.Distiller` built on it keeps the loss terms'
    adapters in sync)."""
    if not runtime.distributed:
        return student
    # a conv weight with one input channel gets gradients whose (irrelevant) stride of the size-1
    # dimension differs from DDP's bucket view; the reducer copies them correctly and only warns
    warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
    ids = [runtime.device.index] if runtime.device.type == "cuda" else None
    return nn.parallel.DistributedDataParallel(student, device_ids=ids)


def any_rank(flag: bool, runtime: Runtime) -> bool:
    """Whether ``flag`` is true on at least one rank; every rank must call it at the same point.

    Lets all ranks stop together: a rank that raised alone would leave the others waiting in the
    next collective (the gradient all-reduce) until the process group times out.
    """
    if not runtime.distributed:
        return flag
    value = torch.tensor([1.0 if flag else 0.0], device=runtime.device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
