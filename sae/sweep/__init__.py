"""Sweeps: the launchers (submitit, our vectorized one), the stacked training of a group of jobs,
and the Hydra callback that keeps a sweep's summary current."""
