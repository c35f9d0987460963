"""How workers start: one process, torchrun, horovodrun, srun. Kept apart from what a worker does."""
