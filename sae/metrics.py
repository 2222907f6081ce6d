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


def rho_hat_summary(rho_hat: Tensor, dead_threshold: float, saturation_level: float) -> dict[str, Tensor]:
    """Mean, min, max of per-unit rho_hat; fraction of units dead (below) and saturated (above)."""
    return {
        "rho_hat_mean": rho_hat.mean(),
        "rho_hat_min": rho_hat.min(),
        "rho_hat_max": rho_hat.max(),
        "dead_fraction": (rho_hat < dead_threshold).float().mean(),
        "saturated_fraction": (rho_hat > saturation_level).float().mean(),
    }


def active_units(codes: Tensor, threshold: float) -> Tensor:
    """Per sample, how many units exceed threshold: the L0 of a sigmoid code, whose values are never 0."""
    return (codes > threshold).sum(dim=1).float()


class FractionOfVarianceUnexplained(Metric):
    """Sum of squared errors over the sum of squared deviations from the split's per-pixel mean.

    Accumulates sums and sums of squares in float64, so the mean-centring uses the whole split's
    per-pixel mean, not each batch's (each batch's reductions run in float64 on the float32
    values, without a float64 copy of the batch).
    """

    full_state_update = False

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.add_state("sse", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.zeros(num_features, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total_sq", torch.zeros(num_features, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, recon: Tensor, target: Tensor) -> None:
        recon, target = recon.detach(), target.detach()
        self.sse += (recon - target).square().sum(dtype=torch.float64)
        self.total += target.sum(dim=0, dtype=torch.float64)
        self.total_sq += target.square().sum(dim=0, dtype=torch.float64)
        self.count += target.shape[0]

    def compute(self) -> Tensor:
        sst = (self.total_sq - self.total.pow(2) / self.count).sum()
        return (self.sse / sst).float()
