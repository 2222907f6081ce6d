"""A linear probe: how much class information a representation keeps, read off by logistic regression."""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor


class LinearClassifier(NamedTuple):
    """Multinomial logistic regression on features standardized with the training statistics,
    in float64 (fit_linear_classifier says why)."""

    mean: Tensor
    std: Tensor
    weight: Tensor
    bias: Tensor

    def accuracy(self, x: Tensor, y: Tensor) -> float:
        with torch.no_grad():
            logits = ((x.to(self.weight.dtype) - self.mean) / self.std) @ self.weight + self.bias
        return (logits.argmax(dim=1) == y).float().mean().item()


# Part of the pixel classifier's cache key: a classifier cached by another solver is refitted.
PROBE_SOLVER = "lbfgs-written-gradient-float64"


def probe_loss_and_grad(
    features_t: Tensor, one_hot_t: Tensor, weight: Tensor, bias: Tensor, weight_decay: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Mean cross-entropy + weight_decay / 2 * ||weight||^2, and its gradients, written out.

    Class-major layout (features_t: features x samples, one_hot_t: classes x samples): the
    softmax then runs along the samples, where a CPU vectorizes well; over 10 classes per row it
    costs more than the two matrix products. autograd is not needed for a loss this simple.
    """
    n = features_t.shape[1]
    logits = torch.addmm(bias[:, None], weight.T, features_t)  # classes x samples
    top = logits.amax(dim=0)
    exp = (logits - top).exp_()
    total = exp.sum(dim=0)
    loss = (
        (total.log() + top).mean() - (logits * one_hot_t).sum() / n + 0.5 * weight_decay * weight.pow(2).sum()
    )
    residual = exp.div_(total).sub_(one_hot_t).div_(n)  # d loss / d logits
    return loss, features_t @ residual.T + weight_decay * weight, residual.sum(dim=1)


def fit_linear_classifier(
    train_x: Tensor, train_y: Tensor, num_classes: int = 10, weight_decay: float = 1e-4, max_iter: int = 100
) -> LinearClassifier:
    """Full-batch L-BFGS from zero weights: deterministic for given inputs (no seed, no batch order).

    In float64: the 100 steps stop before convergence, where float32's rounding (which changes
    with the thread count) moved the accuracy by up to 0.003; in float64 the same codes give the
    same accuracy on 1 thread or 2, here or in a sweep's worker process (docs/probe.md).
    """
    with torch.no_grad():  # the gradient is written out (probe_loss_and_grad); fine under inference mode too
        x = train_x.detach().double()
        mean, std = x.mean(0), x.std(0).clamp_min(1e-6)
        features_t = ((x - mean) / std).T.contiguous()
        one_hot_t = F.one_hot(train_y.detach().to(x.device), num_classes).T.to(x.dtype).contiguous()
        weight = torch.zeros(x.shape[1], num_classes, dtype=x.dtype, device=x.device)
        bias = torch.zeros(num_classes, dtype=x.dtype, device=x.device)
        optimizer = torch.optim.LBFGS(
            [weight, bias], lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
        )

        def closure() -> Tensor:
            loss, weight.grad, bias.grad = probe_loss_and_grad(
                features_t, one_hot_t, weight, bias, weight_decay
            )
            return loss

        optimizer.step(closure)
    return LinearClassifier(mean, std, weight, bias)


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
