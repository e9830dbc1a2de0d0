"""jacplug inside the frameworks people already train with, each a thin layer over :class:`jacplug.Distiller`.

- :mod:`jacplug.integrations.timm_task`: ``JacobianDistillationTask``, a ``timm.task.TrainingTask``;
- :mod:`jacplug.integrations.hf_trainer`: ``JacobianDistillationTrainer``, a Hugging Face ``Trainer``;
- :mod:`jacplug.integrations.lightning_module`: ``DistillationModule``, a ``lightning.LightningModule``.

Nothing here is imported by ``import jacplug``: each module imports its framework when it is imported
itself, so a framework that is not installed costs nothing until it is asked for (then the error
names the pip extra that installs it). docs/integrations.md has an example for each.
"""
