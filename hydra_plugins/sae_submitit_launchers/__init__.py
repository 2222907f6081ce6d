"""submitit launchers whose sweep outlives a job that died, as a Hydra plugin (see sae/sweep/launchers.py)."""
