"""The vectorized launcher as a Hydra plugin (see sae/sweep/vectorized.py)."""
