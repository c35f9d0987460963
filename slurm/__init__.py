"""The sbatch template ``scaling slurm render`` fills (``scaling.templates``): a package so a wheel
carries it beside the code."""
