"""The KL sparsity term against closed forms, torch.distributions and float64 finite differences."""

import math

import pytest
import torch
from torch.distributions import Bernoulli, kl_divergence

from sae.core.loss import objective, reconstruction_loss, split_objective
from sae.core.model import AutoencoderOutput
from sae.core.sparsity import kl_sparsity, make_method


def forward_output(activations: dict, decoder_weight=None, recon=None) -> AutoencoderOutput:
    """A model output holding what the penalty terms read: the covered layers' activations."""
    code = activations["latent"]
    return AutoencoderOutput(
        recon=code if recon is None else recon,
        code=code,
        activations=activations,
        decoder_weight=torch.eye(code.shape[1]) if decoder_weight is None else decoder_weight,
        latent_preactivation=code,
        decode=lambda z: z,
        latent_input=code,
        latent_layer=lambda h: h,
    )


def test_kl_hand_checked_values():
    # By hand, with six-figure logarithms:
    #   KL(0.05 || 0.5) = 0.05 ln 0.1  + 0.95 ln 1.9    = -0.115129 + 0.609761 = 0.494632
    #   KL(0.05 || 0.2) = 0.05 ln 0.25 + 0.95 ln 1.1875 = -0.069315 + 0.163258 = 0.093943
    got = kl_sparsity(0.05, torch.tensor([0.5], dtype=torch.float64))
    assert got.item() == pytest.approx(0.494632, abs=1e-6)
    both = kl_sparsity(0.05, torch.tensor([0.5, 0.2], dtype=torch.float64))  # summed over units
    assert both.item() == pytest.approx(0.494632 + 0.093943, abs=1e-6)
    # Zero exactly at the target, for every unit.
    assert kl_sparsity(0.05, torch.full((32,), 0.05, dtype=torch.float64)).item() == pytest.approx(
        0.0, abs=1e-15
    )


def test_kl_sums_over_units_and_matches_bernoulli_kl():
    rho_hat = torch.linspace(0.01, 0.99, 50, dtype=torch.float64)
    independent = kl_divergence(Bernoulli(probs=torch.full_like(rho_hat, 0.1)), Bernoulli(probs=rho_hat))
    assert kl_sparsity(0.1, rho_hat).item() == pytest.approx(independent.sum().item(), rel=1e-12)


def test_kl_clamps_dead_and_saturated_units():
    eps = 1e-6
    got = kl_sparsity(0.05, torch.tensor([0.0, 1.0], dtype=torch.float64))
    expected = sum(0.05 * math.log(0.05 / q) + 0.95 * math.log(0.95 / (1 - q)) for q in (eps, 1 - eps))
    assert torch.isfinite(got)
    assert got.item() == pytest.approx(expected, rel=1e-12)


def test_kl_gradient_matches_finite_differences_float64():
    torch.manual_seed(0)
    acts = torch.rand(16, 8, dtype=torch.float64, requires_grad=True)  # batch x units, in (0, 1)
    assert torch.autograd.gradcheck(lambda a: kl_sparsity(0.05, a.mean(0)), (acts,), eps=1e-6, atol=1e-7)


def test_kl_gradient_closed_form():
    # d/dq KL(p||q) = -p/q + (1-p)/(1-q)
    q = torch.tensor([0.02, 0.3, 0.9], dtype=torch.float64, requires_grad=True)
    kl_sparsity(0.05, q).backward()
    expected = -0.05 / q.detach() + 0.95 / (1 - q.detach())
    torch.testing.assert_close(q.grad, expected)


def test_kl_method_uses_batch_mean_per_unit_and_sums_layers():
    a = torch.tensor([[0.1, 0.9], [0.3, 0.5]], dtype=torch.float64)
    b = torch.tensor([[0.2], [0.4], [0.6]], dtype=torch.float64)
    expected = kl_sparsity(0.05, torch.tensor([0.2, 0.7], dtype=torch.float64)) + kl_sparsity(
        0.05, torch.tensor([0.4], dtype=torch.float64)
    )
    kl = make_method({"method": "kl", "rho": 0.05, "beta": 0.5}, ["latent", "encoder_1"], 32)
    got = kl.batch_terms(
        forward_output({"latent": a, "encoder_1": b, "decoder_1": b}), a
    )  # decoder_1: not covered
    assert list(got) == ["kl_batch"]
    assert got["kl_batch"].item() == pytest.approx(expected.item(), rel=1e-12)
    split = kl.split_terms(
        {
            "latent": torch.tensor([0.2, 0.7], dtype=torch.float64),
            "encoder_1": torch.tensor([0.4], dtype=torch.float64),
        },
        torch.eye(2),
        {},
    )
    assert split["kl"].item() == pytest.approx(expected.item(), rel=1e-12)


def test_objective_is_reconstruction_plus_beta_times_the_named_terms():
    x = torch.tensor([[0.0, 1.0], [0.5, 0.25]], dtype=torch.float64)
    recon = torch.tensor([[0.5, 0.5], [0.5, 0.75]], dtype=torch.float64)
    code = torch.tensor([[0.1, 0.2], [0.3, 0.4]], dtype=torch.float64)
    out = forward_output({"latent": code}, torch.eye(2), recon=recon)
    kl = make_method({"method": "kl", "rho": 0.1, "beta": 0.5}, ["latent"], 32)
    got = objective("mse", kl, out, x)
    assert list(got) == ["loss", "mse", "kl_batch"]
    mse = 0.1875  # (0.25 + 0.25 + 0 + 0.25) / 4
    kl_value = kl_sparsity(0.1, torch.tensor([0.2, 0.3], dtype=torch.float64)).item()
    assert got["mse"].item() == pytest.approx(mse)
    assert got["kl_batch"].item() == pytest.approx(kl_value, rel=1e-12)
    assert got["loss"].item() == pytest.approx(mse + 0.5 * kl_value, rel=1e-12)
    whole = split_objective(
        kl,
        torch.tensor(mse, dtype=torch.float64),
        {"latent": torch.tensor([0.2, 0.3], dtype=torch.float64)},
        torch.eye(2),
        {"latent": torch.tensor([0.5, 0.5], dtype=torch.float64)},
    )
    assert list(whole) == ["loss", "penalty", "kl"] and whole["loss"].item() == pytest.approx(
        mse + 0.5 * kl_value
    )
    assert whole["penalty"].item() == pytest.approx(0.5 * kl_value)  # what the penalty adds: beta * kl
    with pytest.raises(ValueError, match="method='nope' must be one of kl, l1"):
        make_method({"method": "nope"}, [], 32)
    with pytest.raises(ValueError, match="k=3 must be absent: kl's settings are rho, beta"):
        make_method({"method": "kl", "k": 3}, [], 32)


def test_reconstruction_losses_are_per_pixel_means():
    x = torch.tensor([[0.0, 1.0], [0.5, 0.25]])
    r = torch.tensor([[0.5, 0.5], [0.5, 0.75]])
    assert reconstruction_loss("mse", r, x).item() == pytest.approx((0.25 + 0.25 + 0 + 0.25) / 4)
    bce = (
        -(math.log(0.5) + math.log(0.5) + math.log(0.5) + (0.25 * math.log(0.75) + 0.75 * math.log(0.25))) / 4
    )
    assert reconstruction_loss("bce", r, x).item() == pytest.approx(bce, rel=1e-6)
    with pytest.raises(ValueError, match="unknown reconstruction loss 'l1'"):
        reconstruction_loss("l1", r, x)


def test_l1_hand_case_weighs_units_by_their_decoder_columns():
    # Two samples, two units; decoder columns of norm 5 (3, 4) and 1 (0, 1).
    z = torch.tensor([[1.0, 2.0], [0.0, 4.0]], dtype=torch.float64)
    decoder = torch.tensor([[3.0, 0.0], [4.0, 1.0]], dtype=torch.float64)
    l1 = make_method({"method": "l1", "beta": 0.1}, ["latent"], 32)
    got = l1.batch_terms(forward_output({"latent": z}, decoder), z)["l1"]
    assert got.item() == pytest.approx(((1 * 5 + 2 * 1) + (0 * 5 + 4 * 1)) / 2)  # 5.5
    assert l1.penalty({"l1": got}).item() == pytest.approx(0.55)
    # Over a split: the unit means (0.5, 3) weighted the same way give the same number.
    split = l1.split_terms({"latent": z.mean(0)}, decoder, {})["l1"]
    assert split.item() == pytest.approx(5.5)


def test_l1_cannot_be_dodged_by_rescaling_codes_against_the_decoder():
    torch.manual_seed(0)
    z, decoder = torch.rand(8, 4, dtype=torch.float64), torch.randn(6, 4, dtype=torch.float64)
    l1 = make_method({"method": "l1", "beta": 1.0}, ["latent"], 32)
    scale = torch.tensor([0.1, 2.0, 10.0, 1.0], dtype=torch.float64)  # per unit: z_j * c_j, d_j / c_j
    same = l1.batch_terms(forward_output({"latent": z * scale}, decoder / scale), z)["l1"]
    torch.testing.assert_close(same, l1.batch_terms(forward_output({"latent": z}, decoder), z)["l1"])


def test_l1_gradient_matches_finite_differences_float64():
    torch.manual_seed(0)
    z = torch.rand(5, 3, dtype=torch.float64, requires_grad=True)
    decoder = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    l1 = make_method({"method": "l1", "beta": 1.0}, ["latent"], 32)
    assert torch.autograd.gradcheck(
        lambda a, d: l1.batch_terms(forward_output({"latent": a}, d), a)["l1"], (z, decoder)
    )
