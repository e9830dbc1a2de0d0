"""``JacobianDistillationTrainer``: the Hugging Face ``Trainer`` with jacplug's distillation step.

The Trainer's image-classification distillation recipe subclasses ``Trainer`` and overrides
``compute_loss``; this class does that with a :class:`jacplug.Distiller`, so the loss can hold
Jacobian terms. Everything else is the Trainer's own: data, optimizer and schedule, gradient
accumulation, mixed precision (``bf16=True``: the forward passes run under its autocast, the loss
terms outside it), distributed training, logging, checkpoints.

- The student is ``model`` (a ``transformers`` model returning a ``ModelOutput`` with ``.logits``, or
  any module returning logits); the teacher may be either kind too. Batches are dicts with the
  images under ``input_key`` (``"pixel_values"``) and the labels under ``label_key`` (``"labels"``).
- Training steps return the Distiller's total; each term's mean since the last log, averaged over the
  processes, is added to the Trainer's own logs (``kd``, ``jacobian``, ...). Evaluation steps return
  the student's cross-entropy, as a classification model's own loss is.
- Learnable loss parts (FitNet adapters) join the Trainer's optimizer (a parameter group with the
  Trainer's weight decay) and, in a multi-process run, have their gradients averaged after every
  backward pass (the Trainer's DDP covers only the model), and zeroed after every optimizer step (the
  Trainer zeroes only the model's gradients, so they would accumulate). Each checkpoint holds them beside the
  model (``jacplug_loss.safetensors``), and ``train(resume_from_checkpoint=...)`` restores them, so a
  resumed run continues them (their optimizer state is in the Trainer's own ``optimizer.pt``).
- The model file the Trainer writes is the student's own ``state_dict``; :meth:`student_state_dict`
  gives it in memory.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from ..distiller import Distiller
from ..errors import UserError
from ..losses.composite import WeightedLoss
from ..outputs import logits_of

try:
    from transformers import Trainer, TrainerCallback
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("jacplug.integrations.hf_trainer needs transformers: pip install 'jacplug[huggingface]'") from exc


_logger = logging.getLogger(__name__)

#: the loss terms' learnable state (FitNet adapters), beside the model in each checkpoint directory
LOSS_STATE_FILE = "jacplug_loss.safetensors"


class _ZeroLossGradients(TrainerCallback):
    """After each optimizer step, the adapters' gradients are cleared, as the Trainer clears the model's."""

    def __init__(self, loss: nn.Module) -> None:
        self.loss = loss

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.loss.zero_grad()


class JacobianDistillationTrainer(Trainer):
    """``Trainer(model=student, args=..., ...)`` plus ``teacher_model`` and jacplug's ``loss`` (spec
    strings, a ``{name: weight}`` dict or a ``WeightedLoss``; default: jacplug's preset), and the
    Distiller's ``check_gradients`` and ``teacher_input``. The teacher is frozen and kept in eval mode.
    """

    def __init__(
        self,
        *args: Any,
        teacher_model: nn.Module,
        loss: WeightedLoss | Sequence[str] | Mapping[str, float] | None = None,
        input_key: str = "pixel_values",
        label_key: str = "labels",
        check_gradients: bool = True,
        teacher_input: Callable[[Tensor], Tensor] | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(teacher_model, nn.Module):
            raise UserError(f"teacher_model= takes the teacher as an nn.Module (a transformers or timm model, built "
                            f"and trained), got {type(teacher_model).__name__} {teacher_model!r}")
        for name, key in (("input_key", input_key), ("label_key", label_key)):
            if not isinstance(key, str):
                raise UserError(f"{name}= names a batch key, a str; got {type(key).__name__} {key!r}")
        super().__init__(*args, **kwargs)
        self.distiller = Distiller(self.model, teacher_model, loss, amp=False, check_gradients=check_gradients,
                                   name=type(self.model).__name__, teacher_input=teacher_input)
        self.distiller.to(self.args.device)
        self.input_key, self.label_key = input_key, label_key
        if self.args.label_names is None:  # found from the forward's signature: none for a model that takes only images
            self.label_names = [label_key]
        # compute_loss returns per-batch means: the Trainer must scale them for gradient accumulation itself
        self.model_accepts_loss_kwargs = False
        self._term_sums: dict[str, Tensor] = {}
        self._term_count = 0
        self.add_callback(_ZeroLossGradients(self.distiller.loss))

    def compute_loss(self, model: nn.Module, inputs: Mapping[str, Any], return_outputs: bool = False,
                     num_items_in_batch: Any = None) -> Tensor | tuple[Tensor, Any]:
        images, labels = self._batch(inputs)
        if not (model.training and torch.is_grad_enabled()):  # evaluation: the student's own classification loss
            logits = logits_of(model(images), "student")
            loss = F.cross_entropy(logits.float(), labels) if labels is not None else logits.new_zeros(())
            return (loss, {"logits": logits}) if return_outputs else loss
        self.distiller.student_wrapper = model  # the Trainer's wrapper (DDP), whose forward syncs gradients
        out = self.distiller(images, labels)
        for key in self.distiller.loss.terms:
            value = out[key].detach()
            self._term_sums[key] = self._term_sums.get(key, 0.0) + value
        self._term_count += 1
        return (out["loss"], {"logits": out["output"]}) if return_outputs else out["loss"]

    def training_step(self, *args: Any, **kwargs: Any) -> Tensor:
        loss = super().training_step(*args, **kwargs)
        self.distiller.sync_gradients()  # the adapters: not in the Trainer's DDP module
        return loss

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """The Trainer's optimizer, with the loss terms' adapters as one more parameter group."""
        optimizer = super().create_optimizer(*args, **kwargs)
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        adapters = [p for p in self.distiller.loss.parameters() if p.requires_grad and id(p) not in held]
        if adapters:
            optimizer.add_param_group({"params": adapters, "weight_decay": self.args.weight_decay})
        return optimizer

    def student_state_dict(self) -> dict[str, Tensor]:
        """The student's own ``state_dict``, loadable into the bare model (no wrapper's prefix)."""
        return self.distiller.student.state_dict()

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """The Trainer's model files, and the loss terms' adapters beside them."""
        super()._save(output_dir, state_dict=state_dict)
        state = self.distiller.loss.state_dict()
        if state and self.args.should_save:
            directory = output_dir if output_dir is not None else self.args.output_dir
            save_file({k: v.detach().cpu().contiguous() for k, v in state.items()},
                      os.path.join(directory, LOSS_STATE_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        """The Trainer's model weights, and the adapters the checkpoint holds."""
        super()._load_from_checkpoint(resume_from_checkpoint, model)
        loss = self.distiller.loss
        path = os.path.join(resume_from_checkpoint, LOSS_STATE_FILE)
        if os.path.isfile(path):
            device = next(iter(loss.state_dict().values()), torch.empty(0)).device
            loss.load_state_dict(load_file(path, device=str(device)))
        elif loss.state_dict():
            _logger.warning(f"{resume_from_checkpoint} has no {LOSS_STATE_FILE}: the loss terms' adapters restart "
                            f"from their initial weights")

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        """The Trainer's logs, with each term's mean over the steps since the last training log, averaged
        over the processes as the Trainer averages its loss (every rank logs training at the same step)."""
        if "loss" in logs and self._term_count:
            keys = list(self._term_sums)
            means = torch.stack([torch.as_tensor(self._term_sums[key]) for key in keys]).double() / self._term_count
            if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(means)
                means /= dist.get_world_size()
            logs = {**logs, **dict(zip(keys, means.tolist()))}
            self._term_sums, self._term_count = {}, 0
        super().log(logs, *args, **kwargs)

    def _batch(self, inputs: Mapping[str, Any]) -> tuple[Tensor, Tensor | None]:
        if self.input_key not in inputs:
            raise UserError(f"the batch has no {self.input_key!r} (it has {sorted(inputs)}); pass "
                            f"input_key= the name of the images, or remove_unused_columns=False in TrainingArguments "
                            f"when the model's forward does not take {self.input_key!r}")
        if self.label_key not in inputs and self.model.training:
            needing = [key for key, term in self.distiller.loss.terms.items() if "targets" in term.needs]
            if needing:
                raise UserError(f"the batch has no {self.label_key!r} (it has {sorted(inputs)}), but loss terms "
                                f"{needing} read labels; pass label_key= the name of the labels")
        return inputs[self.input_key], inputs.get(self.label_key)
