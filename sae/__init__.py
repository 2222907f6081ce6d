"""Sparse autoencoders on MNIST with PyTorch Lightning and Hydra (README.md)."""

import os

# OpenMP, which runs torch's CPU ops on several threads, keeps an idle worker thread spinning for
# a while before it sleeps (libgomp: 300k spins). When other processes hold the cores, that
# spinning takes turns from the threads doing the work, and training slows many times over at
# random (docs/performance.md, "A busy CPU"). A short spin costs nothing measurable on an idle
# machine. OpenMP reads this when torch loads it: here, before any import of torch. A setting of
# the user's own (GOMP_SPINCOUNT or OMP_WAIT_POLICY) is left as it is.
if "OMP_WAIT_POLICY" not in os.environ:
    os.environ.setdefault("GOMP_SPINCOUNT", "1000")
