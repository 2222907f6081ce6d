"""The per-run figures keep a readable, bounded size whatever the width of the model, and are
written whole or not at all."""

from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.figure import Figure
from PIL import Image

from sae.callbacks import RunFigures
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


class FakeModule:
    """What RunFigures reads of a module: its rho, codes, reconstructions and first-layer weights."""

    hparams = SimpleNamespace(rho=0.05)

    def encode(self, images):
        return torch.rand(len(images), 8)

    def reconstruct(self, images):
        return images

    def input_filters(self):
        return torch.randn(16, 784)


def test_figures_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A figure whose write fails half-way leaves the previous PNG (another process may be reading
    it) and no temporary file; the figures before it are complete."""
    images, labels = torch.rand(50, 784), torch.arange(50) % 10
    trainer = SimpleNamespace(
        global_rank=0,
        loggers=[],
        global_step=0,
        datamodule=SimpleNamespace(split=lambda name: (images, labels)),
    )
    plots = tmp_path / "plots"
    plots.mkdir()
    (plots / "unit_means.png").write_bytes(b"the previous figure")
    real_savefig = Figure.savefig

    def fail_on_unit_means(fig, f, **kwargs):
        if "Per-unit" in fig.axes[0].get_title():
            f.write(b"half a png")
            raise OSError("the writer was interrupted")
        real_savefig(fig, f, **kwargs)

    monkeypatch.setattr(Figure, "savefig", fail_on_unit_means)
    with pytest.raises(OSError, match="interrupted"):
        RunFigures(str(plots)).on_test_end(trainer, FakeModule())
    assert (plots / "unit_means.png").read_bytes() == b"the previous figure"
    assert not list(plots.glob(".*.tmp"))
    for name in ("latent_histogram", "code_heatmap"):  # drawn before it, and complete
        with Image.open(plots / f"{name}.png") as png:
            png.verify()
