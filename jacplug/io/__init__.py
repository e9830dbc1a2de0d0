"""Files and locks, the bottom floor of the run: checkpoints in safetensors, atomic writes, the run
directory's lock. Nothing here knows about training; everything above writes through it."""
