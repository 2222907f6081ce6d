"""Sparse autoencoders on MNIST with PyTorch Lightning and Hydra (README.md).

The packages, lowest first (docs/design.md): errors, names, internals; core; config; run; data;
report; training; sweep; cli. A package imports only from its own layer and the layers below.
Importing sae sets nothing in the process (no environment variable, no plotting backend).
"""
