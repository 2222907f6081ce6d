"""Whole-split metrics, accumulated exactly across batches (and devices) with torchmetrics."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class UnitMeanActivation(Metric):
    """Per-unit mean activation (rho_hat) over every sample seen, not a mean of batch means."""

    full_state_update = False

    def __init__(self, num_units: int) -> None:
        super().__init__()
        self.add_state("total", torch.zeros(num_units, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, activations: Tensor) -> None:
        self.total += activations.detach().sum(dim=0, dtype=torch.float64)
        self.count += activations.shape[0]

    def compute(self) -> Tensor:
        return (self.total / self.count).float()


def rho_hat_summary(rho_hat: Tensor, dead_threshold: float) -> dict[str, Tensor]:
    """Mean, min, max of per-unit rho_hat and the fraction of units below dead_threshold."""
    return {
        "rho_hat_mean": rho_hat.mean(),
        "rho_hat_min": rho_hat.min(),
        "rho_hat_max": rho_hat.max(),
        "dead_fraction": (rho_hat < dead_threshold).float().mean(),
    }
