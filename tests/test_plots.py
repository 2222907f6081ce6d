"""The per-run figures keep a readable, bounded size whatever the width of the model."""

import matplotlib.pyplot as plt
import pytest
import torch

from sae.plots import MAX_UNITS, run_figures


@pytest.mark.parametrize("latent_dim", [32, 4096])
def test_figures_stay_bounded_for_wide_latents(latent_dim):
    torch.manual_seed(0)
    images, labels = torch.rand(200, 784), torch.arange(200) % 10
    codes = torch.rand(200, latent_dim) ** 4
    figures = run_figures(images, labels, codes, images[:16], torch.randn(latent_dim, 784), rho=0.05)
    try:
        for name, fig in figures.items():
            width, height = fig.get_size_inches() * fig.dpi
            assert width <= 1600 and height <= 1600, (name, width, height)
        title = figures["unit_patterns"].axes[0].get_title()
        if latent_dim > MAX_UNITS:
            assert f"({MAX_UNITS} of {latent_dim} units, the most active)" in title
        else:
            assert "units, the most active" not in title
    finally:
        for fig in figures.values():
            plt.close(fig)
