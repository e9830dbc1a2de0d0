"""What the student learned: how closely its input gradients follow the teacher's on held-out images.

Srinivas & Fleuret (ICML 2018) distil the teacher's input-output Jacobian into the student (their
Eq. 10) and argue that the student's input gradients then resemble the teacher's, also on inputs it
never trained on. The training loss only shows the match on training batches; this module measures it
on images the student never saw, and draws the gradient maps that make it visible (saliency in the
style of the paper's figures).

Everything here is measurement: the models are evaluated in eval mode (their modes restored after), in
their own precision (float64 models in float64, anything else in float32) with autocast off, with no
graph kept and no parameter ``.grad`` written, so BatchNorm statistics, the random number generators
and the models' training state are exactly as they were. A library function, usable in any loop.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from .engine import vjp
from .io.files import atomic_write
from .losses.jacobian_terms import row_distance, unit_rows

#: the norm floor of the ``jacobian`` loss term's unit rows (its ``eps`` default)
EPS = 1e-8


def input_gradient_agreement(
    student: nn.Module,
    teacher: nn.Module,
    images: Tensor,
    *,
    batch_size: int = 256,
    projections: int = 0,
    generator: torch.Generator | None = None,
    eps: float = EPS,
) -> dict[str, float]:
    """Agreement of the student's input gradients with the teacher's on ``images`` ``[N, C, H, W]``.

    For each image, ``i`` is the teacher's top-1 class and ``J_T[i]``, ``J_S[i]`` the input gradients
    of logit ``i`` of the teacher and of the student, flattened. Returns means over the images:

    - ``agreement_cosine``: ``cos(J_T[i], J_S[i])``, 1 when the gradients point the same way (0 for a
      zero gradient);
    - ``agreement_distance``: ``|| n(J_T[i]) - n(J_S[i]) ||_2^2`` with ``n(v) = v / max(||v||_2, eps)``:
      **squared**, exactly the value of the ``jacobian`` loss term (Eq. 10) with its defaults
      (``classes="top1"``, ``squared=True``), so it reads on the scale of the training loss; in
      ``[0, 4]``, 0 for identical directions, and ``2 - 2 * agreement_cosine`` for non-zero gradients;
    - with ``projections=k > 0``, an all-class estimate: for ``k`` random class mixtures
      ``v ~ N(0, I_C)`` per image (shared by both networks), ``agreement_projected_distance``, the mean
      of ``|| n(v^T J_T) - n(v^T J_S) ||_2^2`` (the ``jacobian-projected`` term with
      ``normalize=True``: direction agreement of the whole Jacobian seen through random mixtures of
      its rows, not only the top-1 row), and ``agreement_projected_cosine``, the mean cosine of those
      pairs. ``generator`` draws ``v`` (default: a fresh one seeded 0, so the estimate is repeatable
      and the global generators are left alone).

    Models need no double-differentiable ops here (one backward pass each, no graph kept).
    """
    reference = teacher_reference(teacher, images, batch_size=batch_size, projections=projections,
                                  generator=generator)
    return agreement_with(student, reference, eps=eps)


@dataclass(frozen=True)
class TeacherReference:
    """What the agreement compares a student with, computed once for a frozen teacher: the images in chunks,
    each chunk's output vectors ``[B, 1 + k, C]`` (the teacher's top-1 one-hot, then ``k`` random mixtures)
    and the teacher's rows ``v^T J_T`` (float64). A loop measuring at every evaluation reuses it, so each
    evaluation costs the student's forward and backward only."""

    chunks: tuple[Tensor, ...]
    vectors: tuple[Tensor, ...]
    rows: tuple[Tensor, ...]

    @property
    def count(self) -> int:
        return sum(len(chunk) for chunk in self.chunks)


def teacher_reference(teacher: nn.Module, images: Tensor, *, batch_size: int = 256, projections: int = 0,
                      generator: torch.Generator | None = None) -> TeacherReference:
    """The teacher's side of :func:`input_gradient_agreement` for ``images`` ``[N, C, H, W]``."""
    if images.dim() < 2 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty batch [N, C, H, W], got shape {tuple(images.shape)}")
    if batch_size < 1 or projections < 0:
        raise ValueError(f"batch_size must be >= 1 and projections >= 0, got {batch_size} and {projections}")
    device = _device_of(teacher)
    if generator is None and projections:
        generator = torch.Generator(device=device).manual_seed(0)
    chunks, vectors, rows = [], [], []
    with _measuring(teacher):
        for chunk in images.split(batch_size):
            chunk = chunk.to(device)
            teacher_logits, teacher_inputs = _forward(teacher, chunk)
            classes = teacher_logits.detach().argmax(1)
            chunk_vectors = _output_vectors(teacher_logits, classes, projections, generator)
            chunks.append(chunk)
            vectors.append(chunk_vectors)
            rows.append(vjp(teacher_logits, teacher_inputs, chunk_vectors, create_graph=False).double())
    return TeacherReference(tuple(chunks), tuple(vectors), tuple(rows))


def agreement_with(student: nn.Module, reference: TeacherReference, *, eps: float = EPS) -> dict[str, float]:
    """:func:`input_gradient_agreement` of ``student`` against a :func:`teacher_reference`."""
    totals: dict[str, float] = {}
    with _measuring(student):
        for chunk, vectors, teacher_rows in zip(reference.chunks, reference.vectors, reference.rows):
            student_logits, student_inputs = _forward(student, chunk.to(_device_of(student)))
            student_rows = vjp(student_logits, student_inputs, vectors.to(student_logits), create_graph=False)
            student_rows = student_rows.double()
            for key, value in _row_agreement(student_rows[:, :1], teacher_rows[:, :1], eps).items():
                totals[f"agreement_{key}"] = totals.get(f"agreement_{key}", 0.0) + value
            if vectors.shape[1] > 1:
                for key, value in _row_agreement(student_rows[:, 1:], teacher_rows[:, 1:], eps).items():
                    totals[f"agreement_projected_{key}"] = totals.get(f"agreement_projected_{key}", 0.0) + value
    return {key: value / reference.count for key, value in totals.items()}


def predicted_classes(model: nn.Module, images: Tensor, *, batch_size: int = 256) -> Tensor:
    """The model's top-1 class for each image ``[N]`` (eval mode, its own precision, no autocast)."""
    device = _device_of(model)
    with _measuring(model), torch.no_grad():
        chunks = images.split(batch_size)
        return torch.cat([model(_as_input(model, chunk.to(device))).argmax(1).cpu() for chunk in chunks])


def gradient_maps(model: nn.Module, images: Tensor, classes: Tensor) -> Tensor:
    """Saliency maps ``[N, H, W]`` in ``[0, 1]``: ``|d logit_classes[n] / d image_n|`` summed over channels,
    each map divided by its maximum (as in the paper's figures, which compare where the gradients are
    large, not how large). Pass the teacher's classes (:func:`predicted_classes`) for every model, so
    all maps of an image explain the same class."""
    if classes.shape != images.shape[:1]:
        raise ValueError(f"classes must be [N] = [{images.shape[0]}], got shape {tuple(classes.shape)}")
    device = _device_of(model)
    with _measuring(model):
        logits, inputs = _forward(model, images.to(device))
        onehot = nn.functional.one_hot(classes.to(device), logits.shape[1]).to(logits.dtype)
        grads = vjp(logits, inputs, onehot, create_graph=False)
    return _saliency(grads)


def reference_maps(reference: TeacherReference, count: int) -> tuple[Tensor, Tensor]:
    """The teacher's classes ``[count]`` and gradient maps ``[count, H, W]`` (as :func:`gradient_maps` draws
    them) of the first ``count`` images of a :func:`teacher_reference`, read from its rows: no teacher pass."""
    classes = torch.cat([vectors[:, 0].argmax(-1) for vectors in reference.vectors])[:count].cpu()
    rows = torch.cat([rows[:, 0] for rows in reference.rows])[:count]
    return classes, _saliency(rows)


def _saliency(grads: Tensor) -> Tensor:
    """``|grads|`` ``[N, C, H, W]`` summed over channels, each map divided by its maximum."""
    saliency = grads.detach().abs().sum(1).float().cpu()
    peak = saliency.flatten(1).amax(1).clamp_min(torch.finfo(saliency.dtype).tiny)
    return saliency / peak.view(-1, 1, 1)


#: what a gradient map is, under the picture (jacplug train's gradient_maps.png)
MAP_CAPTION = ("Each map: |d logit / d input| of the teacher's top-1 class, summed over channels, scaled to its own "
               "maximum (where the network looks, not how strongly).")
#: inches the picture adds beside the maps for the colour bar, and above and below them for the title and caption
MAP_BAR_INCHES, MAP_TEXT_INCHES = 0.9, 1.0


def gradient_map_figure(
    images: Tensor,
    teacher_maps: Tensor,
    student_maps_before: Tensor,
    student_maps_after: Tensor,
    path: str | Path,
    *,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Path:
    """Draw the images (row 1) over the teacher's gradient maps and the student's before and after training
    (rows 2-4; maps from :func:`gradient_maps`) and write the PNG to ``path`` atomically (a reader never sees
    half a file). ``mean``/``std``: the normalisation applied to ``images``, undone for display.

    A title, a colour bar for the maps and a caption say what a map is: ``|d logit / d input|`` of the
    teacher's top-1 class, summed over channels, each map scaled to its own maximum (so maps compare by
    where they point, not by size). The picture is 1.2 inches per image plus 0.9 for the colour bar wide,
    and 5.8 inches high (4.8 for the rows, 1 for the title and caption), at 100 dpi (``8`` images:
    1050 x 580 pixels).
    """
    from matplotlib.figure import Figure  # matplotlib: start-up time, only the picture needs it

    count = images.shape[0]
    for name, maps in (("teacher_maps", teacher_maps), ("student_maps_before", student_maps_before),
                       ("student_maps_after", student_maps_after)):
        if maps.shape != (count, *images.shape[2:]):
            raise ValueError(f"{name} must be [N, H, W] = {[count, *images.shape[2:]]}, got {list(maps.shape)}")
    shown = _displayable(images, mean, std)
    rows = [("image", shown, None), ("teacher", teacher_maps, "inferno"),
            ("student before", student_maps_before, "inferno"), ("student after", student_maps_after, "inferno")]
    width, height = 1.2 * count + MAP_BAR_INCHES, 4.8 + MAP_TEXT_INCHES
    figure = Figure(figsize=(width, height), dpi=100)
    axes = figure.subplots(len(rows), count, squeeze=False)
    drawn = None
    for row, (label, pictures, colormap) in enumerate(rows):
        for column in range(count):
            axis = axes[row][column]
            picture = pictures[column].detach().cpu().numpy()
            if colormap is None:
                axis.imshow(picture, cmap="gray" if picture.ndim == 2 else None, vmin=0, vmax=1)
            else:
                drawn = axis.imshow(picture, cmap=colormap, vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
        axes[row][0].set_ylabel(label, fontsize=8)
    top, bottom = 1 - 0.4 / height, 0.6 / height
    right = (1.2 * count) / width
    figure.subplots_adjust(left=0.06 * 9.6 / width, right=right, top=top, bottom=bottom, wspace=0.05, hspace=0.05)
    bar = figure.add_axes((right + 0.15 / width, bottom + (top - bottom) * 0.05, 0.15 / width, (top - bottom) * 0.7))
    figure.colorbar(drawn, cax=bar).set_label("share of the map's maximum", fontsize=7)
    bar.tick_params(labelsize=7)
    figure.suptitle("Input gradients on held-out images: teacher, and student before and after training",
                    fontsize=9, y=1 - 0.08 / height, va="top", wrap=True)
    figure.text(0.5, 0.08 / height, MAP_CAPTION, ha="center", va="bottom", fontsize=7, wrap=True)
    path = Path(path)
    atomic_write(path, lambda fh: figure.savefig(fh, format="png", dpi=100))
    return path


def _displayable(images: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    """``[N, H, W]`` (one channel) or ``[N, H, W, 3]`` in ``[0, 1]``: normalisation undone, then clipped."""
    images = images.detach().float().cpu()
    channels = images.shape[1]
    if std is not None:
        images = images * torch.tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    if mean is not None:
        images = images + torch.tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    if mean is None and std is None:  # unknown range: stretch each image to [0, 1]
        low = images.flatten(1).amin(1).view(-1, 1, 1, 1)
        high = images.flatten(1).amax(1).view(-1, 1, 1, 1)
        images = (images - low) / (high - low).clamp_min(1e-12)
    images = images.clamp(0, 1)
    return images[:, 0] if channels == 1 else images[:, :3].permute(0, 2, 3, 1)


def _row_agreement(student: Tensor, teacher: Tensor, eps: float) -> dict[str, float]:
    """Sums over the batch of the per-image means over rows ``[B, R, *S]`` of the cosine and of the squared
    distance of unit rows (the ``jacobian`` term's own :func:`row_distance`)."""
    cosine = (unit_rows(student, eps) * unit_rows(teacher, eps)).sum(-1)
    distance = row_distance(student, teacher, normalize=True, squared=True, eps=eps)
    return {"cosine": cosine.mean(1).sum().item(), "distance": distance.mean(1).sum().item()}


def _output_vectors(logits: Tensor, classes: Tensor, projections: int, generator: torch.Generator | None) -> Tensor:
    """``[B, 1 + k, C]``: the one-hot of each image's class (``v^T J`` is then the row ``J[i]``), then ``k``
    random mixtures ``v ~ N(0, I_C)``."""
    onehot = nn.functional.one_hot(classes, logits.shape[1]).to(logits.dtype).unsqueeze(1)
    if not projections:
        return onehot
    shape = (logits.shape[0], projections, logits.shape[1])
    mixtures = torch.randn(shape, generator=generator, dtype=logits.dtype, device=logits.device)
    return torch.cat([onehot, mixtures], 1)


def _forward(model: nn.Module, images: Tensor) -> tuple[Tensor, Tensor]:
    """``(logits, inputs)`` with ``inputs`` a fresh leaf that requires grad, in the model's precision."""
    inputs = _as_input(model, images).detach().requires_grad_(True)
    with torch.enable_grad():
        return model(inputs), inputs


def _as_input(model: nn.Module, images: Tensor) -> Tensor:
    return images.to(torch.float64 if _dtype_of(model) == torch.float64 else torch.float32)


def _dtype_of(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _device_of(model: nn.Module) -> torch.device:
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@contextlib.contextmanager
def _measuring(*models: nn.Module) -> Iterator[None]:
    """Eval mode (every submodule's own mode restored after), autocast off, and the random number
    generators of the CPU and of the models' CUDA devices restored after, so measuring changes nothing."""
    modes = [(module, module.training) for model in models for module in model.modules()]
    devices = sorted({p.device.index or 0 for model in models for p in model.parameters() if p.is_cuda})
    device_types = {p.device.type for model in models for p in model.parameters()} or {"cpu"}
    try:
        with torch.random.fork_rng(devices=devices), contextlib.ExitStack() as stack:
            for device_type in device_types:
                stack.enter_context(torch.autocast(device_type, enabled=False))
            for model in models:
                model.eval()
            yield
    finally:
        for module, training in modes:
            module.training = training
