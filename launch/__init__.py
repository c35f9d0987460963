"""How workers start: one process, torchrun's and horovodrun's ways, TF_CONFIG, srun. Kept apart from what a worker does."""
