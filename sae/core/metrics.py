"""Whole-split metrics, accumulated exactly across batches (and devices) with torchmetrics."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics import Metric


class UnitActivity(Metric):
    """Per unit, over every sample seen: the mean activation (rho_hat) and the firing frequency
    (the fraction of samples on which the unit is active) at each of several thresholds.

    A unit is active on a sample when its activation is strictly above the threshold: 0 for
    ReLU and TopK codes (exact zeros), a small level such as 0.1 for sigmoid codes (never 0).
    The mean number of active units per sample (L0) is the sum of the firing frequencies.
    """

    full_state_update = False

    def __init__(self, num_units: int, thresholds: tuple[float, ...] | list[float] = (0.0,)) -> None:
        super().__init__()
        self.thresholds = tuple(float(t) for t in thresholds)
        self.add_state("total", torch.zeros(num_units, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state(
            "active", torch.zeros(len(self.thresholds), num_units, dtype=torch.float64), dist_reduce_fx="sum"
        )
        self.add_state("count", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, activations: Tensor) -> None:
        activations = activations.detach()
        self.total += activations.sum(dim=0, dtype=torch.float64)
        for i, threshold in enumerate(self.thresholds):
            self.active[i] += (activations > threshold).sum(dim=0, dtype=torch.float64)
        self.count += activations.shape[0]

    def compute(self) -> tuple[Tensor, Tensor]:
        """(rho_hat of each unit, firing frequency of each unit at each threshold (thresholds x units))."""
        return (self.total / self.count).float(), (self.active / self.count).float()


def pixel_variance(images: Tensor, chunk: int = 4096) -> float:
    """Each pixel's variance over the images (population), averaged over pixels: Gao et al.'s
    Var(x). Accumulated in float64 chunk by chunk, not on a float64 copy of the whole set."""
    mean = sum(part.sum(dim=0, dtype=torch.float64) for part in images.split(chunk)) / len(images)
    squares = sum(((part.double() - mean) ** 2).sum(dim=0) for part in images.split(chunk))
    return float(squares.mean() / len(images))


def off_values(codes: Tensor, threshold: float) -> Tensor:
    """Per unit, the mean of its codes at or below `threshold` (0 for a unit never there): the
    constant the unit reads as while L0 counts it inactive. A decoder bias can absorb a constant,
    so replacing those codes by it keeps what a code carries in its active units only."""
    below = codes <= threshold
    total = torch.where(below, codes, 0.0).sum(dim=0, dtype=torch.float64)
    return (total / below.sum(dim=0).clamp_min(1)).to(codes.dtype)


def truncate_codes(codes: Tensor, threshold: float, off: Tensor) -> Tensor:
    """The code the decoder would see if only the units L0 counts were active: each code at or
    below `threshold` replaced by its unit's off value (`off_values`). For ReLU and TopK codes
    (threshold 0, inactive codes exactly 0, off values 0) it is the code itself."""
    return torch.where(codes > threshold, codes, off)


def rho_hat_summary(rho_hat: Tensor) -> dict[str, Tensor]:
    """Mean, min and max over units of the per-unit mean activation."""
    return {"rho_hat_mean": rho_hat.mean(), "rho_hat_min": rho_hat.min(), "rho_hat_max": rho_hat.max()}


def density_summary(density: Tensor, rare_below: float, dense_above: float) -> dict[str, Tensor]:
    """Fractions of units by firing frequency: dead (never active), rare (active on fewer than
    `rare_below` of the samples, dead ones included) and dense (on more than `dense_above`)."""
    return {
        "dead_fraction": (density == 0).float().mean(),
        "rare_fraction": (density < rare_below).float().mean(),
        "dense_fraction": (density > dense_above).float().mean(),
    }


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
