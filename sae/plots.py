"""Per-run figures: what the latent code looks like and what each unit responds to.

Every function takes CPU tensors and returns a matplotlib Figure of a fixed size (so the saved
PNGs have a known size); `run_figures` builds them all from a model and the test split.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, never a window

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import seaborn as sns  # noqa: E402
import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from torch import Tensor  # noqa: E402

DPI = 100
MAX_UNITS = 64  # per-unit tiles and tick labels shown at most (figures keep their size)
MAX_TILES = 128
RHO_STYLE = {"color": "crimson", "linestyle": "--", "linewidth": 1.5}


def _figure(width: float, height: float) -> Figure:
    return plt.figure(figsize=(width, height), dpi=DPI, layout="constrained")


def activation_histogram(codes: Tensor, rho: float) -> Figure:
    """All latent activations on the test set: a sparse code piles up near 0."""
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    sns.histplot(codes.flatten().numpy(), bins=50, binrange=(0, 1), ax=ax, color="steelblue")
    ax.set_yscale("log")
    ax.axvline(rho, **RHO_STYLE, label=f"rho = {rho:g}")
    ax.set(xlabel="latent activation", ylabel="count (log scale)", xlim=(0, 1))
    ax.set_title(f"Latent activations on the test set ({codes.shape[0]} digits x {codes.shape[1]} units)")
    ax.legend()
    return fig


def code_heatmap(codes: Tensor, labels: Tensor) -> Figure:
    """The codes of one test batch, one row per digit, sorted by class."""
    order = torch.argsort(labels, stable=True)
    codes, labels = codes[order], labels[order]
    fig = _figure(9, 7)
    ax = fig.add_subplot()
    sns.heatmap(
        codes.numpy(),
        vmin=0,
        vmax=1,
        cmap="viridis",
        ax=ax,
        cbar_kws={"label": "activation"},
        yticklabels=[str(int(c)) for c in labels],
    )
    ax.set(xlabel="latent unit", ylabel="test digit (label)")
    ax.set_title(f"Latent codes of {len(codes)} test digits, sorted by class")
    ax.tick_params(axis="y", labelsize=6)
    return fig


def unit_mean_bars(rho_hat: Tensor, rho: float) -> Figure:
    """Per-unit mean activation (rho_hat) against the target rho."""
    fig = _figure(10, 4.5)
    ax = fig.add_subplot()
    units = np.arange(len(rho_hat))
    ax.bar(units, rho_hat.numpy(), color="steelblue", width=0.8)
    if len(units) <= MAX_UNITS:  # one label per unit while they stay readable
        ax.set_xticks(units)
    ax.set_xlim(-0.6, len(units) - 0.4)
    ax.axhline(rho, **RHO_STYLE, label=f"target rho = {rho:g}")
    ax.axhline(float(rho_hat.mean()), color="black", linewidth=1, label=f"mean = {float(rho_hat.mean()):.4f}")
    ax.set(xlabel="latent unit", ylabel="mean activation on the test set (rho_hat)")
    ax.set_title("Per-unit mean activation")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend()
    return fig


def _tiles(ax, images: np.ndarray, ncols: int, titles: list[str] | None = None, cmap: str = "gray") -> None:
    """Draw 28x28 images as one mosaic on ax, each scaled to its own range, titles above each."""
    n = len(images)
    nrows = int(np.ceil(n / ncols))
    pad_x, pad_y = 2, (10 if titles else 2)
    height, width = nrows * (28 + pad_y), ncols * (28 + pad_x) - pad_x
    mosaic = np.full((height, width), np.nan)
    for i, img in enumerate(images):
        lo, hi = img.min(), img.max()
        img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
        r, c = divmod(i, ncols)
        top, left = r * (28 + pad_y) + pad_y, c * (28 + pad_x)
        mosaic[top : top + 28, left : left + 28] = img.reshape(28, 28)
    ax.imshow(mosaic, cmap=cmap, interpolation="nearest")
    ax.set_axis_off()
    for i, title in enumerate(titles or []):
        r, c = divmod(i, ncols)
        ax.text(
            c * (28 + pad_x) + 14, r * (28 + pad_y) + pad_y - 1.5, title, ha="center", va="bottom", fontsize=8
        )


def reconstruction_grid(images: Tensor, recon: Tensor) -> Figure:
    """Test digits (top row) above their reconstructions (bottom row)."""
    n = len(images)
    fig = _figure(12, 2.4)
    axes = fig.subplots(2, n)
    for i in range(n):
        for row, (src, name) in enumerate(((images, "original"), (recon, "reconstruction"))):
            ax = axes[row, i]
            ax.imshow(src[i].reshape(28, 28).numpy(), cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(name, fontsize=8)
    fig.suptitle(f"{n} test digits: originals (top), reconstructions (bottom)")
    return fig


def encoder_filters(weight: Tensor) -> Figure:
    """First-layer encoder weights, one 28x28 tile per hidden unit (blue negative, red positive);
    at most MAX_TILES units (those with the largest weights), so wide layers keep a readable size."""
    n = weight.shape[0]
    shown = weight.norm(dim=1).topk(min(n, MAX_TILES)).indices.sort().values
    ncols = 16 if len(shown) > 64 else 8
    fig = _figure(12, 12 * int(np.ceil(len(shown) / ncols)) / ncols + 0.6)
    ax = fig.add_subplot()
    _tiles(ax, weight[shown].numpy(), ncols, cmap="RdBu_r")
    which = f"{n} units" if len(shown) == n else f"{len(shown)} of {n} units, the largest weights"
    ax.set_title(f"First-layer encoder filters ({which}, each scaled to its own range)")
    return fig


def unit_patterns(images: Tensor, codes: Tensor, top_k: int = 20) -> Figure:
    """For each latent unit, the mean of the test digits that activate it most; at most MAX_UNITS
    units (the most active), so wide latents keep a readable size."""
    k = min(top_k, len(images))
    n = codes.shape[1]
    shown = codes.mean(dim=0).topk(min(n, MAX_UNITS)).indices.sort().values
    top = codes[:, shown].topk(k, dim=0).indices  # (k, units shown)
    patterns = images[top].mean(dim=0)  # (units shown, 784)
    ncols = 8
    fig = _figure(12, 12 * int(np.ceil(len(shown) / ncols)) * (38 / 30) / ncols + 0.6)
    ax = fig.add_subplot()
    _tiles(ax, patterns.numpy(), ncols, titles=[f"unit {int(j)}" for j in shown])
    which = "" if len(shown) == n else f" ({len(shown)} of {n} units, the most active)"
    ax.set_title(f"What each latent unit responds to: mean of its top {k} test digits{which}")
    return fig


def class_heatmap(codes: Tensor, labels: Tensor) -> Figure:
    """Mean activation of each unit for each digit class."""
    classes = sorted(int(c) for c in labels.unique())
    table = torch.stack([codes[labels == c].mean(dim=0) for c in classes], dim=1)  # units x classes
    fig = _figure(7, 9)
    ax = fig.add_subplot()
    sns.heatmap(
        table.numpy(),
        cmap="magma",
        ax=ax,
        xticklabels=classes,
        cbar_kws={"label": "mean activation"},
    )
    ax.set(xlabel="digit class", ylabel="latent unit")
    ax.set_title("Mean activation per unit and digit class (test set)")
    ax.tick_params(axis="y", labelsize=7)
    return fig


def run_figures(
    images: Tensor, labels: Tensor, codes: Tensor, reconstructions: Tensor, filters: Tensor, rho: float
) -> dict[str, Figure]:
    """All per-run figures of a (test) split of 28x28 images, by file name stem.

    codes: the latent codes of every image; reconstructions: those of the first few images;
    filters: the first layer's weights, one row per hidden unit.
    """
    shown = images[: len(reconstructions)]
    return {
        "latent_histogram": activation_histogram(codes, rho),
        "code_heatmap": code_heatmap(codes[:64], labels[:64]),
        "unit_means": unit_mean_bars(codes.mean(dim=0), rho),
        "reconstructions": reconstruction_grid(shown, reconstructions),
        "encoder_filters": encoder_filters(filters),
        "unit_patterns": unit_patterns(images, codes),
        "class_heatmap": class_heatmap(codes, labels),
    }


def pareto_front(xs: list[float], ys: list[float]) -> list[int]:
    """Indices of the points not dominated when both coordinates are minimised, sorted by x."""
    order = sorted(range(len(xs)), key=lambda i: (xs[i], ys[i]))
    front, best_y = [], float("inf")
    for i in order:
        if ys[i] < best_y:
            front.append(i)
            best_y = ys[i]
    return front


PARETO_PANELS = (
    ("test/rho_hat_mean", "mean latent activation, rho_hat (lower = sparser)"),
    ("test/l0", "L0: active latent units per digit (lower = sparser)"),
)


def pareto_figure(rows: list[dict], label_keys: list[str], reference: dict[str, float]) -> Figure:
    """test/mse against sparsity, one point per finished job, the Pareto frontier drawn."""
    fig = _figure(14, 6)
    axes = fig.subplots(1, len(PARETO_PANELS))
    for ax, (metric, xlabel) in zip(axes, PARETO_PANELS, strict=True):
        points = [
            r
            for r in rows
            if isinstance(r.get(metric), int | float) and isinstance(r.get("test/mse"), int | float)
        ]
        xs, ys = [float(r[metric]) for r in points], [float(r["test/mse"]) for r in points]
        ax.scatter(xs, ys, s=40, color="steelblue", zorder=3, label="sweep job")
        front = pareto_front(xs, ys)
        if front:
            ax.plot(
                [xs[i] for i in front],
                [ys[i] for i in front],
                color="darkorange",
                linewidth=2,
                marker="o",
                zorder=2,
                label="Pareto frontier",
            )
        for r, x, y in zip(points, xs, ys, strict=True):
            label = ", ".join(
                f"{k}={r[k]:g}" if isinstance(r.get(k), float) else f"{k}={r.get(k)}" for k in label_keys
            )
            ax.annotate(label or r["job"], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if metric in reference:
            ax.scatter(
                [reference[metric]],
                [reference["test/mse"]],
                marker="*",
                s=250,
                color="crimson",
                zorder=4,
                label=f"reference notebook, published ({reference[metric]:g}, {reference['test/mse']:g})",
            )
        ax.set(xlabel=xlabel, ylabel="test MSE (lower = better)")
        ax.set_title(f"Reconstruction vs {metric}")
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.12, y=0.08)  # room for the labels of the outermost points
        ax.legend(fontsize=8, loc="best")
    fig.suptitle(f"Sweep: {len(rows)} finished jobs")
    return fig
