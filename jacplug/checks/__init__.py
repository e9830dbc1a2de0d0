"""The checks that run before anything is trained, each named for what it proves.

- :mod:`~jacplug.checks.gradient_flow`: every loss term reaches the parameters it should train (and the
  one that does not is named);
- :mod:`~jacplug.checks.derivatives`: a model supports the derivatives a Jacobian term takes (the op
  without one, the module that calls it, forward mode that PyTorch gets wrong);
- :mod:`~jacplug.checks.first_call`: the two above, on the batch of :class:`jacplug.Distiller`'s first call,
  turned into one line naming the op, the module, the terms that need it and the terms that would work;
- :mod:`~jacplug.checks.step_inputs`: what a caller hands :class:`jacplug.Distiller` (arguments, batches,
  devices, channels, labels, the optimizer), one line each;
- :mod:`~jacplug.checks.probe_batch`: the batch ``jacplug train`` and ``jacplug experiment`` check before
  the teacher phase.

The Jacobian entry points' own argument checks stay in the engine (:mod:`jacplug.engine.arguments`): the
engine runs them on every call and imports nothing above itself. Nothing is imported here, so a module
of the engine layer may import one of these without pulling in the others.
"""
