"""Whole-split metrics against direct computation on the concatenated split."""

import pytest
import torch

from sae.metrics import UnitMeanActivation, rho_hat_summary


def test_unit_mean_is_over_samples_not_a_mean_of_batch_means():
    torch.manual_seed(0)
    batches = [torch.rand(n, 4) for n in (7, 1, 30)]  # unequal sizes: batch means would differ
    metric = UnitMeanActivation(4)
    for b in batches:
        metric.update(b)
    whole = torch.cat(batches).double().mean(0).float()
    torch.testing.assert_close(metric.compute(), whole)
    mean_of_means = torch.stack([b.mean(0) for b in batches]).mean(0)
    assert not torch.allclose(metric.compute(), mean_of_means, atol=1e-3)


def test_rho_hat_summary_hand_case():
    rho_hat = torch.tensor([0.0005, 0.05, 0.1, 0.0])
    s = {k: v.item() for k, v in rho_hat_summary(rho_hat, dead_threshold=1e-3).items()}
    assert s["rho_hat_mean"] == pytest.approx((0.0005 + 0.05 + 0.1) / 4)
    assert s["rho_hat_min"] == 0.0
    assert s["rho_hat_max"] == pytest.approx(0.1)
    assert s["dead_fraction"] == 0.5
