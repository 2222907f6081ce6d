"""A linear probe: how much class information a representation keeps, read off by logistic regression."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class LinearClassifier(NamedTuple):
    """Multinomial logistic regression on features standardized with the training statistics."""

    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        with torch.no_grad():
            logits = ((x.float() - self.mean) / self.std) @ self.weight + self.bias
        return (logits.argmax(dim=1) == y).float().mean().item()


def fit_linear_classifier(
    train_x: Tensor, train_y: Tensor, num_classes: int = 10, weight_decay: float = 1e-4, max_iter: int = 100
) -> LinearClassifier:
    """Full-batch L-BFGS from zero weights: deterministic for given inputs (no seed, no batch order)."""
    with torch.inference_mode(False), torch.enable_grad():
        # Clones: inputs made under inference mode cannot take part in autograd.
        train_x = train_x.detach().float().clone()
        mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
        train_x = (train_x - mean) / std
        weight = torch.zeros(train_x.shape[1], num_classes, device=train_x.device, requires_grad=True)
        bias = torch.zeros(num_classes, device=train_x.device, requires_grad=True)
        optimizer = torch.optim.LBFGS(
            [weight, bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
        )
        labels = train_y.detach().clone()

        def closure() -> Tensor:
            optimizer.zero_grad()
            loss = F.cross_entropy(train_x @ weight + bias, labels)
            loss = loss + 0.5 * weight_decay * weight.pow(2).sum()
            loss.backward()
            return loss

        optimizer.step(closure)
    return LinearClassifier(mean, std, weight.detach(), bias.detach())


def linear_probe_accuracy(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int = 10,
    weight_decay: float = 1e-4,
    max_iter: int = 100,
) -> float:
    """Test accuracy of a logistic regression fitted on (train_x, train_y)."""
    classifier = fit_linear_classifier(train_x, train_y, num_classes, weight_decay, max_iter)
    return classifier.accuracy(test_x, test_y)
