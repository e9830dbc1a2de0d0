"""Training: one loop for every phase (the teacher, the student, each experiment cell), its step plan,
runtime (device, precision, process group), observers and their events, evaluation, the teacher's
preparation and the phase set-up shared by ``jacplug train`` and ``jacplug experiment``."""
