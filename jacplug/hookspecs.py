"""The hooks a jacplug plugin can implement: a public contract, change it only compatibly.

Registration hooks receive a ``register`` callback, called as ``register(name, factory, **metadata)``;
``metadata`` is free-form (``description=`` is shown by ``jacplug plugins``) except for
``override=True``, which lets a plugin replace a name another plugin registered first, an exact name
that a pattern already serves included (a timm model name such as ``resnet18``).

Lifecycle hooks observe training; they receive keyword arguments only, so new ones can be added
without breaking old plugins (pluggy passes each implementation just the arguments it names).
Every hook is called through pluggy, one plugin at a time (see :mod:`jacplug.registry`).
"""

from __future__ import annotations

import pluggy

PROJECT = "jacplug"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_models(register):
    """Register model factories.

    ``register(name, factory, **metadata)``. ``factory(num_classes=..., in_chans=..., pretrained=...,
    **kwargs) -> nn.Module`` returns logits ``[B, num_classes]``. A name containing ``*`` is a
    pattern (fnmatch) that serves many names; its factory then receives the requested name as first
    positional argument, and ``metadata["catalog"]`` (a callable returning the names it serves) is
    used to validate names and suggest close matches.
    """


@hookspec
def register_model_pairs(register):
    """Register recommended teacher/student pairings.

    ``register(name, factory, **metadata)`` where ``name`` is ``"TEACHER->STUDENT"`` and
    ``factory()`` returns a :class:`jacplug.registry.ModelPair` (which stages correspond and their
    channel counts, so feature losses can build adapters).
    """


@hookspec
def register_losses(register):
    """Register loss terms: ``factory(**options) -> jacplug.losses.LossTerm`` (an ``nn.Module``)."""


@hookspec
def register_jacobian_backends(register):
    """Register Jacobian backends: ``factory() -> jacplug.engine.JacobianBackend``."""


@hookspec
def register_datasets(register):
    """Register datasets: ``factory(**options) -> jacplug.commands.DatasetSplits``.

    Pattern names such as ``"imagefolder:*"`` receive the full requested name first.
    """


@hookspec
def register_op_substitutions(register):
    """Register double-differentiable formulations of ops: ``factory() ->
    jacplug.engine.Substitution`` (the functions it replaces, the replacement, and whether it serves
    the exact terms' double backward, forward mode, or both). See docs/jacobian.md."""


@hookspec
def register_observers(register):
    """Register run observers: what a run does besides stepping (the metrics file, progress, checkpoints,
    the curves plot, trackers such as TensorBoard and MLflow).

    ``register(name, factory, default=False, essential=False, description=...)``. ``factory(**options)``
    returns a fresh object whose ``@hookimpl`` methods (the lifecycle hooks below) receive one run's events;
    it is registered for that run only. ``default=True``: on unless the run switches it off
    (``--log-off NAME``); otherwise on only when named (``--log NAME[:KEY=VALUE,...]``, the options passed
    to ``factory``). ``essential=True``: the run cannot be switched off from it (resume state, say).
    """


@hookspec
def register_commands(subparsers):
    """Add ``jacplug`` subcommands: ``subparsers`` is the command line's ``argparse`` sub-parser action.

    ``parser = subparsers.add_parser("NAME", help=...)``, its arguments, then
    ``parser.set_defaults(run=fn)``: ``fn(args) -> int`` runs the command (its exit code; raise a
    :class:`jacplug.errors.UserError` for bad input, printed as one line with exit code 2). Called every
    time the CLI is built (``jacplug --help`` included), so keep heavy imports inside ``fn``.
    """


@hookspec
def on_train_start(run, phase):
    """A training phase is about to start. ``run``: :class:`jacplug.commands.RunContext` (config, models,
    out_dir, device); ``phase``: :class:`jacplug.events.Phase` (``kind`` is ``"teacher"``, ``"student"`` or
    ``"cell"``; its ``name``, ``out_dir`` and ``params``). Called on rank 0 only under DDP, for every phase
    of ``jacplug train`` and for every cell of ``jacplug experiment``."""


@hookspec
def on_step_end(run, phase, step, metrics):
    """After each optimisation step. ``step``: the phase's step (int, from 1); ``metrics``: dict of floats
    (``loss``, one entry per loss term, ``lr``)."""


@hookspec
def on_epoch_end(run, phase, epoch, metrics):
    """After each evaluation: every epoch end, or with a step budget (``--steps``) at most 10 epoch
    ends and the last step. ``epoch``: int from 1, the epoch of the evaluated step; ``metrics``: dict
    of floats (``step``, ``train_loss``, per-term means since the previous evaluation,
    ``val_acc``/``test_acc`` where evaluated, the held-out agreement of the student's input gradients
    with the teacher's where measured: ``agreement_cosine``, ``agreement_distance``)."""


@hookspec
def on_checkpoint(run, phase, step, metrics, files):
    """Checkpoints are due after an evaluation. ``files``: ``{role: Path}`` (``"last"``, and ``"best"``
    when the score improved). The built-in checkpoint writer (``tryfirst``) writes them; observers called
    after it may read them (a tracker logging the model, say)."""


@hookspec
def on_image(run, phase, name, path, step):
    """A picture was written: ``path`` (PNG) named ``name`` (``"gradient_maps"``, ``"curves"``) at ``step``
    of ``phase``; trackers log it as an image."""


@hookspec
def on_train_end(run, phase, summary):
    """A phase finished. ``summary``: dict (accuracies, final per-term losses, checkpoint paths)."""
