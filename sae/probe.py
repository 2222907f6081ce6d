"""A linear probe: how much class information a representation keeps, read off by logistic regression."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def linear_probe_accuracy(
    train_x: Tensor,
    train_y: Tensor,
    test_x: Tensor,
    test_y: Tensor,
    num_classes: int = 10,
    weight_decay: float = 1e-4,
    max_iter: int = 100,
) -> float:
    """Test accuracy of a multinomial logistic regression fitted on (train_x, train_y).

    Features are standardized with the training statistics; the fit is full-batch L-BFGS from
    zero weights, so the result is deterministic for given inputs (no seed, no batch order).
    """
    with torch.inference_mode(False), torch.enable_grad():
        # Clones: inputs made under inference mode cannot take part in autograd.
        train_x, test_x = train_x.detach().float().clone(), test_x.detach().float().clone()
        mean, std = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
        train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
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
        with torch.no_grad():
            predicted = (test_x @ weight + bias).argmax(dim=1)
    return (predicted == test_y).float().mean().item()
