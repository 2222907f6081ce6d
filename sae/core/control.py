"""Steering a run to a target L0 (target_l0): one integral controller, used by the penalty
methods on their weight (sae.core.sparsity.PenaltyMethod) and by JumpReLU on its thresholds
(sae.core.model.JumpReLU)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

# How far one training step moves log(weight) per unit of log((L0 + 1) / (target + 1)).
L0_CONTROL_GAIN = 0.03


class L0Controller(nn.Module):
    """A positive weight adapted during training so that the code's L0 settles at `target`: after
    each training step, log(weight) += gain * log((L0 + 1) / (target + 1)), L0 the step's mean
    count of active latent units (as test/l0 counts them). An integral controller: the weight
    grows while the code is denser than the target and shrinks while it is sparser, for whatever
    weight a larger value makes sparser (a penalty's, a threshold's scale); the +1 keeps a code
    with no active unit finite. The weight is a buffer: checkpointed, resumed, evaluated with."""

    def __init__(self, target: float, initial: float, gain: float = L0_CONTROL_GAIN) -> None:
        super().__init__()
        self.target, self.gain = float(target), float(gain)
        self.register_buffer("log_weight", torch.tensor(math.log(initial)))

    def weight(self) -> Tensor:
        return self.log_weight.exp()

    @torch.no_grad()
    def update(self, l0: Tensor) -> None:
        """One step's correction (tensor arithmetic only: no host sync, recordable in a CUDA graph)."""
        self.log_weight.add_(self.gain * torch.log((l0 + 1) / (self.target + 1)))

    def extra_repr(self) -> str:
        return f"target={self.target:g}, gain={self.gain:g}"
