"""Files and locks, the bottom floor of the run: the one write path (``files``: whole files, never through
links, failures in one line), checkpoints in safetensors, the run directory's lock. Nothing here knows about
training; everything above writes through it."""
