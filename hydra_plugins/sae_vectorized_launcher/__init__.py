"""The vectorized launcher as a Hydra plugin (see sae/vectorized.py)."""
