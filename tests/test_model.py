"""Model shapes, output ranges and the layers the penalty covers."""

import pytest
import torch

from sae.core.model import SparseAutoencoder, TopK, layer_names


def test_default_is_784_128_32_128_784():
    model = SparseAutoencoder()
    linears = [m for m in model.modules() if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [
        (784, 128),
        (128, 32),
        (32, 128),
        (128, 784),
    ]
    assert (
        sum(p.numel() for p in model.parameters())
        == 784 * 128 + 128 + 128 * 32 + 32 + 32 * 128 + 128 + 128 * 784 + 784
    )


def test_forward_shapes_and_ranges():
    torch.manual_seed(0)
    model = SparseAutoencoder()
    x = torch.rand(5, 784)
    out = model(x)
    assert out.recon.shape == (5, 784) and out.code.shape == (5, 32)
    assert set(out.activations) == {"latent"}
    assert torch.equal(out.activations["latent"], out.code)
    for t in (out.recon, out.code):  # sigmoid outputs
        assert t.min() > 0 and t.max() < 1
    assert torch.equal(model.encode(x), out.code)


def test_covered_layers_are_returned_by_name():
    model = SparseAutoencoder(
        hidden_dims=[64, 16], latent_dim=8, sparsity_layers=["encoder_1", "decoder_2", "latent"]
    )
    assert layer_names(2) == ["encoder_1", "encoder_2", "latent", "decoder_1", "decoder_2"]
    out = model(torch.rand(3, 784))
    assert {k: v.shape[1] for k, v in out.activations.items()} == {
        "encoder_1": 64,
        "latent": 8,
        "decoder_2": 64,
    }
    assert (out.activations["encoder_1"] >= 0).all()  # ReLU


def test_unknown_layer_or_activation_is_refused():
    with pytest.raises(ValueError, match=r"sparsity_layers \['encoder_3'\] do not exist"):
        SparseAutoencoder(sparsity_layers=["encoder_3"])
    with pytest.raises(ValueError, match="unknown activation 'swishy'"):
        SparseAutoencoder(activation="swishy")


def test_topk_keeps_the_k_largest_and_passes_gradients_only_through_them():
    torch.manual_seed(0)
    x = torch.randn(6, 10, dtype=torch.float64, requires_grad=True)
    out = TopK(3)(x)
    kept = x.detach().topk(3, dim=1).indices
    for row, idx in zip(out.detach(), kept, strict=True):
        nonzero = set(row.nonzero().flatten().tolist())
        assert nonzero <= set(idx.tolist()) and len(nonzero) <= 3  # the largest three, through a ReLU
    positive = torch.rand(6, 10, dtype=torch.float64) + 0.1
    assert ((TopK(3)(positive) != 0).sum(dim=1) == 3).all()  # exactly k where they are positive
    out.sum().backward()
    mask = torch.zeros_like(x).scatter(1, kept, 1.0) * (x.detach() > 0)
    torch.testing.assert_close(x.grad, mask)  # 1 through each kept positive entry, 0 elsewhere
