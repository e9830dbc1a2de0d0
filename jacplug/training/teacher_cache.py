"""Teacher cache (``--cache-teacher``): the frozen teacher's outputs, computed once per training sample.

Without augmentation the teacher sees the same image every epoch, so its logits and the Jacobian
rows the loss needs are constants. One pass over the training split stores, per sample (keyed by the
sample's position in the training split):

- ``teacher_logits`` ``[N, C]`` float32;
- ``teacher_rows`` ``[N, R]`` int64 and ``teacher_jacobian_rows`` ``[N, R, *S]`` float32: the rows
  every term with a ``rows(batch)`` method selects (the ``jacobian`` term: top-1, label, top-k or
  all classes), concatenated over such terms.

These are exactly the ``batch.cache`` keys of :mod:`jacplug.losses.teacher_rows`, so later steps skip the
teacher's forward and backward. Terms that draw fresh random projections each step
(``jacobian-projected``, ``jacobian-direction``, ``noisy-distill``) still call the teacher; feature
terms need the teacher's feature maps every step and are refused.

The cache is computed exactly as the live teacher would be: under the run's autocast (bf16 on CUDA)
and memory format, with the logits cast to float32 and the Jacobian rows taken outside autocast (see
:class:`jacplug.Distiller`).

The file (``teacher_cache.safetensors`` in the run directory) is read through ``safe_open``, which
memory-maps it: a batch reads only its own samples' rows. Its metadata holds a fingerprint of
everything it depends on (:func:`cache_key`: the teacher's weights, the training tensors themselves,
the loss, the precision and the jacplug version); any change rebuilds it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .._version import __version__
from ..errors import UserError
from ..engine import jacobian
from ..losses.base import DistillBatch
from ..losses.composite import WeightedLoss
from ..losses.teacher_rows import CACHE_JACOBIAN_ROWS, CACHE_ROWS
from ..outputs import at_least_float32, logits_of
from ..io.files import atomic_write_bytes
from ..data.datasets import Indexed
from .runtime import Runtime
from .progress import progress

LOGITS = "teacher_logits"
KEYS = (LOGITS, CACHE_ROWS, CACHE_JACOBIAN_ROWS)


def check_cacheable(loss: WeightedLoss, augment: bool, dataset: str) -> None:
    """Refuse a cache that would be wrong (augmented inputs) or useless (feature terms)."""
    if augment:
        raise UserError(
            f"--cache-teacher needs un-augmented training data, but dataset {dataset!r} is augmented here (random "
            "changes of every training image each epoch, so cached teacher outputs would not match); pass "
            "--no-augment or drop --cache-teacher"
        )
    if loss.feature_layers:
        raise UserError(
            "--cache-teacher does not cache feature maps, and the feature terms "
            f"({', '.join(k for k, t in loss.terms.items() if t.feature_layers)}) need the teacher's features every "
            "step; drop --cache-teacher or the feature terms"
        )


def fingerprint(teacher: nn.Module, parts: dict) -> str:
    """Hash of the teacher's weights and ``parts`` (data, loss), to tell a stale cache file."""
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode())
    for name, tensor in sorted(teacher.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def data_digest(train: Dataset, batch_size: int = 256) -> str:
    """SHA-256 of every training sample's tensor and label, in order: the data's content, so an
    image folder edited in place (same file count, other pixels) or another subset gives another key."""
    digest = hashlib.sha256()
    for inputs, targets in DataLoader(train, batch_size=batch_size, shuffle=False):
        digest.update(inputs.contiguous().numpy().tobytes())
        digest.update(torch.as_tensor(targets).numpy().tobytes())
    return digest.hexdigest()


def cache_key(teacher: nn.Module, train: Dataset, loss_specs: list[str], runtime: Runtime, batch_size: int = 256) -> str:
    """The fingerprint a cache file must carry to be reused: teacher weights, data content, loss,
    precision (the autocast dtype the teacher runs in) and the jacplug version."""
    return fingerprint(teacher, {
        "data": data_digest(train, batch_size),
        "loss": list(loss_specs),
        "precision": str(runtime.amp_dtype or torch.float32),
        "channels_last": runtime.channels_last,
        "jacplug": __version__,
    })


def _row_terms(loss: WeightedLoss) -> list:
    return [term for term in loss.terms.values() if callable(getattr(term, "rows", None)) and "input_grad" in term.needs]


def build_cache(
    path: Path, teacher: nn.Module, loss: WeightedLoss, train: Dataset, runtime: Runtime, batch_size: int,
    key: str, show: bool,
) -> None:
    """Run the teacher once over ``train`` (in order), as the live step runs it (``runtime``'s
    autocast and memory format), and write the cache file atomically."""
    device = runtime.device
    row_terms = _row_terms(loss)
    logits_parts: list[Tensor] = []
    rows_parts: list[Tensor] = []
    jac_parts: list[Tensor] = []
    loader = DataLoader(Indexed(train), batch_size=batch_size, shuffle=False)
    for inputs, targets, _ in progress(loader, desc="teacher cache", show=show):
        x = inputs.to(device)
        if runtime.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        x = x.requires_grad_(bool(row_terms))
        targets = targets.to(device)
        with torch.enable_grad() if row_terms else torch.no_grad(), runtime.autocast():
            logits = at_least_float32(logits_of(teacher(x), "teacher"))
        logits_parts.append(logits.detach().cpu())
        if not row_terms:
            continue
        probe = DistillBatch(inputs=x, student_logits=logits.detach(), teacher_logits=logits.detach(), targets=targets)
        selected = []
        for term in row_terms:
            rows = term.rows(probe)
            if rows is None:  # all classes
                rows = torch.arange(logits.shape[1], device=device).expand(logits.shape[0], -1)
            selected.append(rows.reshape(logits.shape[0], -1))
        rows = torch.cat(selected, 1)
        jac = jacobian(logits, x, rows, create_graph=False).detach()
        rows_parts.append(rows.cpu())
        jac_parts.append(at_least_float32(jac).cpu())
    tensors = {LOGITS: torch.cat(logits_parts).contiguous()}
    if row_terms:
        tensors[CACHE_ROWS] = torch.cat(rows_parts).contiguous()
        tensors[CACHE_JACOBIAN_ROWS] = torch.cat(jac_parts).contiguous()
    atomic_write_bytes(path, save(tensors, metadata={"fingerprint": key}))


class TeacherCache:
    """Memory-mapped lookup of cached teacher quantities by training-sample index."""

    def __init__(self, path: Path, device: torch.device) -> None:
        self._file = safe_open(str(path), framework="pt")
        self.keys = [k for k in KEYS if k in self._file.keys()]
        self.device = device

    @staticmethod
    def matches(path: Path, key: str) -> bool:
        if not path.is_file():
            return False
        try:
            with safe_open(str(path), framework="pt") as fh:
                return (fh.metadata() or {}).get("fingerprint") == key
        except Exception:  # an unreadable cache is rebuilt, never trusted
            return False

    def lookup(self, indices: Tensor) -> dict[str, Tensor]:
        """``{key: [B, ...]}`` for the samples ``indices`` ``[B]`` (positions in the training split)."""
        out = {}
        for key in self.keys:
            rows = self._file.get_slice(key)
            out[key] = torch.cat([rows[i : i + 1] for i in indices.tolist()]).to(self.device, non_blocking=True)
        return out
