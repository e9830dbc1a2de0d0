"""Where the experiment's cells run: in this process, in worker processes (several CPU workers, or one
per CUDA device), or as Ray tasks on a cluster. Every executor runs :func:`protocol.run_one` on a
:class:`RunSpec` with the data and the teacher loaded once per worker, and calls ``done(record)`` as
each cell finishes, so the driver can write the cell's record at once (:mod:`.records`).

Why worker processes: the models are small, so one CPU thread per run is used efficiently while a
second thread mostly waits; ``workers`` processes with ``threads`` threads each run runs in parallel.
On CUDA one process per device (``--devices``) keeps every GPU busy with its own cells.

Why Ray (``--executor ray``): beyond one machine a cell must be placed where a CPU or GPU is free, and
a cell whose worker dies (a lost node, a killed process) must run again elsewhere: Ray does both
(``num_gpus=1`` per task where the cluster has GPUs, ``max_retries`` = ``--retries``); the teacher's
weights go through Ray's object store once instead of every node reading ``--out``. Ray is imported
only when asked for (``pip install 'jacplug[ray]'``).
"""

from __future__ import annotations

import contextlib
import hashlib
import multiprocessing
import multiprocessing.connection
import os
import pickle
import re
import socket
import tempfile
import threading
import traceback
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch

from ..errors import UserError
from ..training.prepare import load_data
from ..training.runtime import Runtime, init_runtime
from . import protocol
from .config import ExperimentConfig, RunSpec
from .methods import METHODS

_WORKER: dict[str, Any] = {}


def _init_worker(config: ExperimentConfig, teacher_path: str, devices: Any = None) -> None:
    """Load the data and the teacher once for every cell this process runs. ``devices``: a queue of
    device names (:func:`worker_devices`), one taken by each pool process; ``None``: ``config.device``."""
    torch.set_num_threads(config.threads)
    if devices is not None:
        exit_with_parent()
    runtime = init_runtime(devices.get() if devices is not None else config.device)
    full = load_data(config)
    _WORKER.update(config=config, full=full, runtime=runtime,
                   teacher=protocol.load_teacher(config, full, Path(teacher_path), runtime))


def exit_with_parent() -> None:
    """In a pool process: exit at once, silently, when the parent process dies.

    Why: a parent killed with SIGKILL (or the OOM killer) cannot terminate its pool, so each worker would
    finish its cell for nobody and then print a ``BrokenPipeError`` traceback sending the result. The
    parent's sentinel (a pipe multiprocessing keeps open in the parent) becomes ready when it dies."""
    parent = multiprocessing.parent_process()
    if parent is None:
        return

    def watch() -> None:
        multiprocessing.connection.wait([parent.sentinel])
        os._exit(0)

    threading.Thread(target=watch, name="jacplug-exit-with-parent", daemon=True).start()


def _run_in_worker(spec: RunSpec) -> dict[str, Any]:
    return protocol.run_one(spec, _WORKER["config"], _WORKER["full"], _WORKER["teacher"], _WORKER["runtime"])


def _run_in_pool(spec: RunSpec) -> dict[str, Any]:
    """:func:`_run_in_worker` in a pool process, whose errors must reach the parent: an error that
    cannot be unpickled there would kill the pool's result thread and leave the parent waiting forever,
    so such an error travels as a ``RuntimeError`` carrying its type, message and traceback."""
    try:
        return _run_in_worker(spec)
    except Exception as error:
        try:
            pickle.loads(pickle.dumps(error))
        except Exception:
            raise RuntimeError(f"{type(error).__name__}: {error}\n{traceback.format_exc()}") from None
        raise


def worker_devices(device: str, devices: str | None, cuda_count: int, workers: int) -> list[str]:
    """One device name per worker process (a single entry: the cells run in this process).

    On the CPU (``device`` cpu, or auto without CUDA): ``workers`` processes. On CUDA: ``devices`` if
    given (``all`` or ``cuda:0,cuda:1``), else every visible GPU, or only ``cuda:N`` when ``device``
    names one. Pure, so the assignment is tested without GPUs."""
    on_cpu = device == "cpu" or (device == "auto" and cuda_count == 0)
    if on_cpu:
        if devices is not None:
            raise UserError(f"--devices {devices!r} names CUDA devices, but the experiment runs on the CPU "
                            "(--device cpu, or no CUDA here); use --workers N for CPU processes")
        return ["cpu"] * workers
    if cuda_count == 0:
        raise UserError(f"--device {device} was requested but CUDA is not available here; use --device cpu or auto")
    if devices is None or devices == "all":
        if devices is None and re.fullmatch(r"cuda:\d+", device):
            return [_existing(device, cuda_count)]
        return [f"cuda:{i}" for i in range(cuda_count)]
    names = [name.strip() for name in devices.split(",")]
    for name in names:
        if not re.fullmatch(r"cuda:\d+", name):
            raise UserError(f"--devices: {name!r} is not a CUDA device; use all, or names like cuda:0,cuda:1")
        _existing(name, cuda_count)
    if len(set(names)) != len(names):
        raise UserError(f"--devices {devices!r} names a device twice; each GPU gets one worker process")
    return names


def _existing(name: str, cuda_count: int) -> str:
    if int(name.split(":")[1]) < cuda_count:
        return name
    raise UserError(f"{name} does not exist: {cuda_count} CUDA device(s) are visible (cuda:0..cuda:{cuda_count - 1})")


class CellExecutor(Protocol):
    """Made before the teacher is trained (so that a bad option or an unreachable cluster is refused
    first); :meth:`start` gives it the teacher's weights, then :meth:`map` runs cells."""

    def start(self, teacher_path: Path) -> None: ...

    def map(self, specs: list[RunSpec], done: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]: ...

    def close(self, abort: bool = False) -> None: ...


class Executor:
    """Runs :class:`RunSpec` lists in this process, or in a spawn pool: ``workers`` processes on the
    CPU, one process per device on CUDA when there are several (:func:`worker_devices`).

    A ``multiprocessing`` pool rather than ``concurrent.futures.ProcessPoolExecutor``: on an error,
    Ctrl-C or ``kill``, ``Pool.terminate`` stops the running workers at once, while the executor can
    only cancel queued work and waits for the running runs to finish."""

    def __init__(self, config: ExperimentConfig, runtime: Runtime) -> None:
        self.pool = None
        self.config = config
        cuda_count = torch.cuda.device_count() if runtime.device.type == "cuda" else 0
        self.devices = worker_devices(config.device, config.devices, cuda_count, config.workers)

    def start(self, teacher_path: Path) -> None:
        config, devices = self.config, self.devices
        if len(devices) > 1:
            context = multiprocessing.get_context("spawn")
            queue = context.Queue()  # each process takes one device name as it starts
            for name in devices:
                queue.put(name)
            self.pool = context.Pool(len(devices), initializer=_init_worker,
                                     initargs=(config, str(teacher_path), queue))
        else:
            _init_worker(replace(config, device=devices[0]), str(teacher_path))

    def map(self, specs: list[RunSpec], done: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
        """Results in the order of ``specs``; ``done`` is called as each finishes (progress, saving)."""
        order = sorted(range(len(specs)), key=lambda i: -_cost(specs[i]))  # long runs first: better packing
        results: dict[int, dict[str, Any]] = {}
        if self.pool is None:
            for i in order:
                results[i] = _run_in_worker(specs[i])
                done(results[i])
        else:
            ordered = [specs[i] for i in order]
            for i, record in zip(order, self.pool.imap(_run_in_pool, ordered)):
                results[i] = record
                done(record)
        return [results[i] for i in range(len(specs))]

    def close(self, abort: bool = False) -> None:
        """Wait for the workers to exit; ``abort`` terminates them first (their queued runs are dropped)."""
        if self.pool is not None:
            self.pool.terminate() if abort else self.pool.close()
            self.pool.join()
        else:
            _WORKER.clear()  # in-process: release the data and teacher held for the runs


def _cost(spec: RunSpec) -> int:
    """Relative run time, for packing: the input-gradient terms take about twice a KD step."""
    return 2 if {"jacobian", "projected", "preset"} & set(METHODS[spec.method].uses) else 1


# ---------------------------------------------------------------------------------------------------
# Ray


class CellFailed(UserError):
    """A cell failed on every attempt Ray made; the finished cells' records are kept."""


def ray_cell(spec: RunSpec, config: ExperimentConfig, teacher: bytes) -> dict[str, Any]:
    """One cell in a Ray worker process; the worker keeps the data and the teacher for its next cells
    (Ray reuses worker processes), keyed by the teacher's bytes."""
    key = hashlib.sha256(teacher).hexdigest()
    if _WORKER.get("key") != key:
        # the copy is needed only while it loads: Ray ends its workers with SIGKILL, so a copy kept for the
        # worker's life would never be removed (one model's size in every worker's temporary folder)
        with tempfile.TemporaryDirectory(prefix="jacplug-teacher-") as folder:
            path = Path(folder) / "teacher.safetensors"
            path.write_bytes(teacher)
            _init_worker(config, str(path))
        _WORKER["key"] = key
    return _run_in_worker(spec)


def import_ray():
    try:
        import ray
    except ImportError:
        raise UserError("--executor ray needs Ray: pip install 'jacplug[ray]'") from None
    return ray


class RayExecutor:
    """Each cell a Ray task: on the cluster at ``--ray-address``, on the Ray instance this process
    already joined, or on a local one started here (and stopped by :meth:`close`)."""

    def __init__(self, config: ExperimentConfig, runtime: Runtime) -> None:
        ray = self.ray = import_ray()
        self.config = config
        self.started = False
        if not ray.is_initialized():
            if config.ray_address:
                _check_reachable(config.ray_address)
            try:
                with on_loopback(ray, config.ray_address):
                    ray.init(address=config.ray_address, include_dashboard=False, logging_level="ERROR")
            except Exception as error:  # ConnectionError, or a RuntimeError naming the address
                if config.ray_address is None:
                    raise
                reason = " ".join(str(error).split())[:200]
                raise UserError(f"--ray-address {config.ray_address!r}: no Ray cluster answers there ({reason}); "
                                "start one with `ray start --head`, or leave --ray-address out to start a "
                                "local one") from None
            self.started = True
        gpus = config.device != "cpu" and ray.cluster_resources().get("GPU", 0) > 0
        self.cell_config = replace(config, device="cuda" if gpus else "cpu")  # Ray picks the GPU of each task
        self.task = ray.remote(ray_cell).options(num_cpus=config.threads, num_gpus=1 if gpus else 0,
                                                 max_retries=config.retries)
        self.teacher = None

    def start(self, teacher_path: Path) -> None:
        self.teacher = self.ray.put(Path(teacher_path).read_bytes())  # once into the object store, for every task

    def map(self, specs: list[RunSpec], done: Callable[[dict[str, Any]], None]) -> list[dict[str, Any]]:
        ray = self.ray
        order = sorted(range(len(specs)), key=lambda i: -_cost(specs[i]))
        pending = {self.task.remote(specs[i], self.cell_config, self.teacher): i for i in order}
        results: dict[int, dict[str, Any]] = {}
        try:
            while pending:
                (ready,), _ = ray.wait(list(pending), num_returns=1)
                i = pending.pop(ready)
                try:
                    results[i] = ray.get(ready)
                except ray.exceptions.RayTaskError as error:  # the cell raised: the error as the local executor
                    if isinstance(error.cause, Exception):  # gives it (a UserError stays one line)
                        raise error.cause from None
                    raise
                except ray.exceptions.RayError as error:  # its worker died on every attempt (killed, node lost)
                    raise CellFailed(f"cell {specs[i].name} failed on each of its {1 + self.config.retries} "
                                     f"attempts ({_last_line(error)}); the finished cells' records are kept, "
                                     "--resume runs the rest") from None
                done(results[i])
        finally:
            for ref in pending:
                ray.cancel(ref, force=True)
        return [results[i] for i in range(len(specs))]

    def close(self, abort: bool = False) -> None:
        if self.started:
            self.ray.shutdown()


@contextlib.contextmanager
def on_loopback(ray: Any, address: str | None) -> Iterator[None]:
    """Around ``ray.init``: a local Ray instance started inside listens on ``127.0.0.1`` only.

    Why: a Ray node's servers (GCS, raylet, object manager, workers) listen on the node's address, and
    whoever reaches them runs code in it (Ray has no authentication); a single-machine experiment needs
    no other host. Ray turns ``_node_ip_address="127.0.0.1"`` into the machine's network address unless it
    runs as a single-machine instance, which its ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` selects (the
    processes Ray starts read it from their environment, this one from ``ray_constants``, read at import);
    both are restored once the instance runs. An address the user names (``--ray-address``,
    ``RAY_ADDRESS``) is a cluster they run, whose nodes must reach this driver: left as Ray sets it."""
    if address or os.environ.get("RAY_ADDRESS"):
        yield
        return
    from ray._private import ray_constants

    variable = ray_constants.ENABLE_RAY_CLUSTERS_ENV_VAR
    saved = os.environ.get(variable), ray_constants.ENABLE_RAY_CLUSTER
    os.environ[variable], ray_constants.ENABLE_RAY_CLUSTER = "0", False
    try:
        yield
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved[1]
        if saved[0] is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = saved[0]


def _check_reachable(address: str) -> None:
    """A one-line refusal when nothing listens at ``HOST:PORT``: Ray itself retries an unreachable
    cluster for minutes before it gives up. Other forms (``auto``, ``ray://...``) are left to Ray."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host, int(port)), timeout=5).close()
    except OSError as error:
        raise UserError(f"--ray-address {address!r}: no Ray cluster answers there ({error.strerror or error}); "
                        "start one with `ray start --head`, or leave --ray-address out to start a local one") from None


def _last_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:300]


def make_executor(config: ExperimentConfig, runtime: Runtime) -> CellExecutor:
    if config.executor == "ray":
        return RayExecutor(config, runtime)
    return Executor(config, runtime)
