"""submitit launchers whose sweep outlives a job that died, as a Hydra plugin (see sae/launchers.py)."""
