"""The per-run figures keep a readable, bounded size whatever the width of the model, and are
written whole or not at all."""

from types import SimpleNamespace

import matplotlib.pyplot as plt
import pytest
import torch
from matplotlib.colors import to_rgb
from matplotlib.figure import Figure
from PIL import Image

from sae.report.figures import (
    DEAD_COLOUR,
    MAX_UNITS,
    png_bytes,
    reconstruction_grid,
    run_figures,
    sweep_metrics,
    write_run_figures,
)
from sae.training.callbacks import RunFigures


@pytest.mark.parametrize("latent_dim", [32, 4096])
def test_figures_stay_bounded_for_wide_latents(latent_dim):
    torch.manual_seed(0)
    images, labels = torch.rand(200, 784), torch.arange(200) % 10
    codes = torch.rand(200, latent_dim) ** 4
    densities = {
        "encoder_1": torch.rand(128),
        "latent": (codes > 0.1).float().mean(0),
        "decoder_1": torch.rand(128),
    }
    figures = run_figures(
        images,
        labels,
        codes,
        images[:16],
        torch.randn(128, 784),
        rho=0.05,
        densities=densities,
        decoded_units=torch.randn(latent_dim, 784),
    )
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
    """What RunFigures reads of a module: its rho, codes, reconstructions, first-layer weights and
    the setting that heads the figures."""

    hparams = SimpleNamespace(l0_threshold=0.1, rare_density=1e-3, dense_density=0.5)
    method = SimpleNamespace(target=lambda: 0.05)  # KL's rho

    def encode(self, images):
        return torch.rand(len(images), 8)

    def reconstruct(self, images):
        return images

    def input_filters(self):
        return torch.randn(16, 784)

    def decoded_units(self):
        return torch.randn(8, 784)

    def unit_activity(self, split):
        return {"encoder_1": (torch.rand(16), torch.rand(16)), "latent": (torch.rand(8), torch.rand(8))}

    def setting(self):
        return "sparsity=kl (rho 0.05, beta 0.005), latent_dim 8, lr 0.001"


@pytest.mark.parametrize("autolayout", [False, True])
def test_a_figure_laid_out_once_has_the_pixels_savefig_gives(autolayout):
    """png_bytes computes the constrained layout once instead of savefig's twice; the image is
    the same, pixel for pixel, also where the user's matplotlibrc asks for another layout."""
    import io

    import matplotlib
    import numpy as np

    torch.manual_seed(0)
    images, labels = torch.rand(300, 784), torch.arange(300) % 10
    codes = torch.rand(300, 32) ** 4
    inputs = dict(images=images, labels=labels, codes=codes, reconstructions=images[:16])
    inputs |= dict(filters=torch.randn(128, 784), rho=0.05, decoded_units=torch.randn(32, 784))
    inputs |= dict(densities={"encoder_1": torch.rand(128), "latent": (codes > 0.1).float().mean(0)})
    inputs |= dict(setting="sparsity=kl (rho 0.05, beta 0.005)")
    with matplotlib.rc_context({"figure.autolayout": autolayout}):
        once = {name: png_bytes(fig) for name, fig in run_figures(**inputs).items()}
    for name, fig in run_figures(**inputs).items():
        reference = io.BytesIO()
        fig.savefig(reference, format="png")
        with Image.open(reference) as expected, Image.open(io.BytesIO(once[name])) as got:
            assert got.size == expected.size, name
            assert np.array_equal(np.asarray(got), np.asarray(expected)), name


def test_figures_are_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """A figure whose write fails half-way leaves the previous PNG (another process may be reading
    it) and no temporary file; the figures before it are complete."""
    images, labels = torch.rand(50, 784), torch.arange(50) % 10
    trainer = SimpleNamespace(
        global_rank=0,
        loggers=[],
        global_step=0,
        default_root_dir=str(tmp_path),
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


def test_tensorboard_gets_each_figure_as_the_png_written(tmp_path):
    """The figures' TensorBoard images are the PNG files' bytes, with their width and height."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    images, labels = torch.rand(50, 784), torch.arange(50) % 10
    inputs = dict(images=images, labels=labels, codes=torch.rand(50, 8), reconstructions=images[:4])
    inputs |= dict(filters=torch.randn(16, 784), rho=0.05, decoded_units=torch.randn(8, 784))
    write_run_figures(tmp_path / "plots", inputs, str(tmp_path / "events"), step=7)
    events = EventAccumulator(str(tmp_path / "events"), size_guidance={"images": 0})
    events.Reload()
    pngs = sorted((tmp_path / "plots").glob("*.png"))
    assert sorted(events.Tags()["images"]) == sorted(f"visuals/{png.stem}" for png in pngs) and len(pngs) == 8
    for png in pngs:
        (image,) = events.Images(f"visuals/{png.stem}")
        with Image.open(png) as written:
            assert (image.width, image.height) == written.size
        assert image.step == 7 and image.encoded_image_string == png.read_bytes()


def test_figures_mark_what_their_titles_and_scales_say():
    """Dead units are counted and framed, the L0 threshold (not rho) is marked on the activation
    histogram, and the scales that runs are compared by are fixed."""
    torch.manual_seed(0)
    images, labels = torch.rand(300, 784), torch.arange(300) % 10
    codes = torch.rand(300, 16) ** 4
    encoder_density = torch.rand(64)
    encoder_density[[3, 7, 11]] = 0.0  # three dead first-layer units
    latent_density = (codes > 0.1).float().mean(0)
    latent_density[0] = 0.0
    figures = run_figures(
        images,
        labels,
        codes,
        images[:8],
        torch.randn(64, 784),
        rho=0.05,
        l0_threshold=0.2,
        densities={"encoder_1": encoder_density, "latent": latent_density},
        decoded_units=torch.randn(16, 784),
        setting="sparsity=kl (rho 0.05, beta 0.005), latent_dim 16, lr 0.001",
    )
    try:
        for name, fig in figures.items():  # each says which run it is
            assert fig.get_suptitle().startswith("sparsity=kl (rho 0.05, beta 0.005), latent_dim 16"), name
        assert figures["feature_density"].get_suptitle().endswith("each unit is active")
        assert "3 never fire on the test set (framed)" in figures["encoder_filters"].axes[0].get_title()
        framed = [p for p in figures["encoder_filters"].axes[0].patches if p.get_edgecolor()[:3] != (0, 0, 0)]
        assert len(framed) == 3
        density_axes = figures["feature_density"].axes
        assert [a.get_title(loc="left") for a in density_axes] == ["encoder_1: 64 units", "latent: 16 units"]
        dead_colour = to_rgb(DEAD_COLOUR)
        dead_bars = [p.get_height() for p in density_axes[0].patches if p.get_facecolor()[:3] == dead_colour]
        assert dead_bars == [3]
        alive = sum(p.get_height() for p in density_axes[0].patches) - 3
        assert alive == 61  # every unit that fired is in a bin
        histogram = figures["latent_histogram"].axes[0]
        assert [line.get_xdata()[0] for line in histogram.get_lines()] == [0.2]
        assert figures["unit_means"].axes[0].get_ylim() == pytest.approx((1e-4, 1.0))
        heatmap_bar = figures["class_heatmap"].axes[1]  # seaborn's colour bar
        assert heatmap_bar.get_ylim() == pytest.approx((0.0, 1.0))
        assert figures["decoder_images"].axes[1].get_ylim()[0] == pytest.approx(
            -figures["decoder_images"].axes[1].get_ylim()[1]
        )
    finally:
        for fig in figures.values():
            plt.close(fig)


def test_a_sweep_over_a_named_option_gets_one_point_per_setting():
    settings = [
        {
            "model.activation": name,
            "n": 1,
            "test/mse": mse,
            "test/l0": 7.0,
            "test/rho_hat_mean": 0.07,
            "rho": 0.05,
        }
        for name, mse in (("relu", 0.018), ("gelu", 0.019))
    ]
    fig = sweep_metrics(settings, [], ["model.activation"])
    try:
        mse_axis = fig.axes[0]
        assert [t.get_text() for t in mse_axis.get_xticklabels()] == [
            "model.activation=relu",
            "model.activation=gelu",
        ]
        assert list(mse_axis.get_lines()[0].get_ydata()) == [0.018, 0.019]
    finally:
        plt.close(fig)


def test_a_numeric_knob_gets_one_line_per_value_of_a_named_one():
    """experiment=overcomplete: latent_dim on the x axis, one line per method (+wide_point=...)."""
    settings = [
        {"wide_point": point, "latent_dim": width, "n": 1, "test/mse": mse, "test/l0": 8.0}
        for point, offset in (("kl", 0.0), ("topk", 0.001))
        for width, mse in ((128, 0.016 + offset), (512, 0.010 + offset))
    ]
    fig = sweep_metrics(settings, ["latent_dim"], ["wide_point", "latent_dim"])
    try:
        lines = [line for line in fig.axes[0].get_lines() if line.get_marker() == "o"]  # not error caps
        assert sorted(tuple(line.get_ydata()) for line in lines) == [(0.016, 0.01), (0.017, 0.011)]
        legend = {t.get_text() for t in fig.axes[0].get_legend().get_texts()}
        assert legend == {"wide_point=kl", "wide_point=topk"}
    finally:
        plt.close(fig)


def test_reconstruction_grid_puts_each_original_above_its_reconstruction():
    gen = torch.Generator().manual_seed(0)
    images, recon = torch.rand(3, 784, generator=gen), torch.rand(3, 784, generator=gen)
    fig = reconstruction_grid(images, recon)
    (ax,) = fig.axes
    mosaic = ax.images[0].get_array()
    assert mosaic.shape == (58, 3 * 30 - 2)  # 2 rows and 3 columns of 28x28 tiles, 2 pixels apart
    for i in range(3):
        assert (mosaic[:28, 30 * i : 30 * i + 28] == images[i].reshape(28, 28).numpy()).all()
        assert (mosaic[30:, 30 * i : 30 * i + 28] == recon[i].reshape(28, 28).numpy()).all()
    assert [t.get_text() for t in ax.get_yticklabels()] == ["original", "reconstruction"]
    plt.close(fig)


def test_the_pareto_figures_bars_are_what_it_says_they_are():
    """Over seeds, a setting's error bars span one sample std of its seeds (as the title says);
    the KL panel's horizontal bars are its units' rho_hat min..max (as its legend says)."""
    from matplotlib.container import ErrorbarContainer

    from sae.report.figures import pareto_figure

    settings = [
        {"beta": b, "rho": 0.05, "n": 3, "test/mse": m, "test/mse_std": 0.002, "test/l0": l0}
        | {"test/l0_std": 0.5, "test/rho_hat_mean": 0.06, "test/rho_hat_min": 0.04, "test/rho_hat_max": 0.09}
        for b, m, l0 in ((1e-3, 0.02, 8.0), (5e-3, 0.025, 5.0))
    ]
    fig = pareto_figure(settings, ["beta"], baselines=[])
    assert "error bars: one sample std over seeds" in fig.get_suptitle()
    target, l0_panel = fig.axes[:2]
    for ax, x_extent in ((l0_panel, 2 * 0.5), (target, (0.09 - 0.04) / 0.05)):
        (bars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
        _, caps, (horizontal, vertical) = bars
        for segment in vertical.get_segments():
            assert segment[1][1] - segment[0][1] == pytest.approx(2 * 0.002)  # +- one std of test/mse
        for segment in horizontal.get_segments():
            assert segment[1][0] - segment[0][0] == pytest.approx(x_extent)
    labels = target.get_legend_handles_labels()[1]
    assert any("horizontal bar: its units' min..max, not a std" in label for label in labels)
    plt.close(fig)


@pytest.mark.parametrize("knobs", [["beta"], ["beta", "rho"]])
def test_sweep_metrics_is_a_grid_of_labelled_panels_about_3_by_2(knobs):
    """One panel per key metric for each swept knob, three to a row, each with its title, its y
    axis saying what the number counts and its x axis the knob; one colour per value of the
    other knob; the whole at most about 3:2 for one knob."""
    settings = [
        {"beta": beta, "rho": rho, "n": 2, "test/mse": 0.02 + beta, "test/mse_std": 0.001, "test/l0": 8.0}
        | {"test/rho_hat_mean": rho + 0.01, "test/dead_fraction": 0.0, "test/probe_accuracy": 0.9}
        for beta in (1e-3, 5e-3, 2e-2)
        for rho in ((0.05, 0.1) if len(knobs) == 2 else (0.05,))
    ]
    fig = sweep_metrics(settings, knobs)
    try:
        width, height = fig.get_size_inches()
        if len(knobs) == 1:
            assert width / height <= 1.55
        panels = fig.axes
        assert len(panels) == 5 * len(knobs)
        assert all(ax.get_title() and ax.get_ylabel() for ax in panels)
        assert [ax.get_xlabel() for ax in panels] == [k for k in knobs for _ in range(5)]
        rows = {round(ax.get_position().y0, 3) for ax in panels}
        assert len(rows) == 2 * len(knobs)  # three panels to a row, two rows a knob
        if len(knobs) == 2:  # against beta, one line (and colour) per rho
            colours = {line.get_color() for line in panels[0].get_lines() if line.get_marker() == "o"}
            assert len(colours) == 2
    finally:
        plt.close(fig)


def test_sweep_metrics_draws_each_seed_as_a_point_and_their_mean_as_a_line():
    jobs = {
        str(i): {"job": str(i), "beta": beta, "seed": seed, "test/mse": 0.02 + beta + 0.001 * seed}
        for i, (beta, seed) in enumerate((b, s) for b in (1e-3, 1e-2) for s in (0, 1, 2))
    }
    settings = [
        {"beta": beta, "n": 3, "jobs": " ".join(j for j, r in jobs.items() if r["beta"] == beta)}
        | {"test/mse": 0.02 + beta + 0.001, "test/mse_std": 0.001}
        for beta in (1e-3, 1e-2)
    ]
    fig = sweep_metrics(settings, ["beta"], jobs=jobs)
    try:
        mse = fig.axes[0]
        (points,) = mse.collections[-1:]
        assert sorted(map(tuple, points.get_offsets().tolist())) == sorted(
            (r["beta"], r["test/mse"]) for r in jobs.values()
        )
        (mean,) = [line for line in mse.get_lines() if line.get_marker() == "_"]
        assert list(mean.get_ydata()) == [0.02 + 1e-3 + 0.001, 0.02 + 1e-2 + 0.001]
        assert "points: each seed; lines: their mean" in fig.get_suptitle()
    finally:
        plt.close(fig)
