"""The sparse-autoencoder objective: reconstruction + beta * KL sparsity penalty."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

RHO_HAT_CLAMP = 1e-6
RECONSTRUCTION_LOSSES = ("mse", "bce")


def kl_sparsity(rho: float, rho_hat: Tensor) -> Tensor:
    """Sum over units of KL(rho || rho_hat_j) between Bernoulli distributions.

    rho_hat is clamped to [1e-6, 1 - 1e-6] so that a dead or saturated unit gives a large but
    finite penalty (and gradient) instead of inf/NaN.
    """
    q = rho_hat.clamp(RHO_HAT_CLAMP, 1.0 - RHO_HAT_CLAMP)
    p = torch.as_tensor(rho, dtype=q.dtype, device=q.device)
    return (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).sum()


def reconstruction_loss(kind: str, recon: Tensor, target: Tensor) -> Tensor:
    """Mean over every pixel of the batch, as nn.MSELoss / nn.BCELoss do by default."""
    if kind == "mse":
        return F.mse_loss(recon, target)
    if kind == "bce":
        return F.binary_cross_entropy(recon, target)
    raise ValueError(f"unknown reconstruction loss {kind!r}; expected one of {RECONSTRUCTION_LOSSES}")


def sparsity_penalty(rho: float, activations: Mapping[str, Tensor]) -> Tensor:
    """KL penalty summed over the covered layers; rho_hat_j is unit j's mean over the batch."""
    return sum(kl_sparsity(rho, a.mean(dim=0)) for a in activations.values())


def objective_terms(kind: str, out, x: Tensor, rho: float | Tensor, beta: float | Tensor) -> Tensor:
    """(loss, recon, kl) of one batch: the training objective recon + beta * KL and its two terms.

    `out` is the model's AutoencoderOutput for x; rho and beta may be tensors (one job's values
    inside a vmap over stacked jobs).
    """
    recon = reconstruction_loss(kind, out.recon, x)
    kl = sparsity_penalty(rho, out.activations)
    return torch.stack([recon + beta * kl, recon, kl])
