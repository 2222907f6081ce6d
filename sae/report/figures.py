"""Per-run figures: what the latent code looks like and what each unit responds to.

Every function takes CPU tensors and returns a matplotlib Figure of a fixed size (so the saved
PNGs have a known size); `run_figures` builds them all from a model and the test split.
"""

from __future__ import annotations

import io
import struct
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.patches
import numpy as np
import seaborn as sns
import torch
from matplotlib.figure import Figure
from torch import Tensor

from sae.names import ERROR_AXIS, MATCHED_COSINE, MATCHED_FRACTION, SPARSITY_AXIS
from sae.names import label as metric_label
from sae.report.consistency import MATCHED_ABOVE
from sae.report.frontier import frontier_axes, is_number, pareto_front
from sae.run.atomic import write_atomic

DPI = 100
MAX_UNITS = 64  # per-unit tiles and tick labels shown at most (figures keep their size)
MAX_TILES = 128
RHO_STYLE = {"color": "crimson", "linestyle": "--", "linewidth": 1.5}
THRESHOLD_STYLE = {"color": "black", "linestyle": ":", "linewidth": 1.5}
UNIT_MEAN_RANGE = (1e-4, 1.0)  # fixed, so that runs' unit_means figures compare side by side
DEAD_COLOUR = "crimson"


def _figure(width: float, height: float) -> Figure:
    """A figure of its own, outside pyplot: no backend is chosen, no window can open, nothing to
    close (savefig renders with Agg; the figure is freed with its last reference)."""
    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def activation_histogram(codes: Tensor, l0_threshold: float) -> Figure:
    """All latent activations on the test set, with the level above which a code counts as active
    (the L0 threshold). rho is a target for a unit's mean, not for single values: see unit_means."""
    fig = _figure(8, 4.5)
    ax = fig.add_subplot()
    top = max(1.0, float(codes.max()))
    counts, edges = np.histogram(codes.flatten().numpy(), bins=50, range=(0, top))
    ax.stairs(counts, edges, fill=True, color="steelblue", alpha=0.8)  # one artist, not 50 bars
    ax.set_yscale("log")
    ax.axvline(l0_threshold, **THRESHOLD_STYLE, label=f"active above {l0_threshold:g} (L0 threshold)")
    ax.set(xlabel="latent activation", ylabel="count (log scale)", xlim=(0, top))
    ax.set_title(f"Latent activations on the test set ({codes.shape[0]} digits x {codes.shape[1]} units)")
    ax.legend()
    return fig


def code_heatmap(codes: Tensor, labels: Tensor) -> Figure:
    """The codes of one test batch, one row per digit, sorted by class."""
    order = torch.argsort(labels, stable=True)
    codes, labels = codes[order], labels[order]
    fig = _figure(9, 7)
    ax = fig.add_subplot()
    _heatmap(ax, codes.numpy(), "viridis", 1.0, "activation", yticklabels=[str(int(c)) for c in labels])
    ax.set(xlabel="latent unit", ylabel="test digit (label)")
    ax.set_title(f"Latent codes of {len(codes)} test digits, sorted by class")
    ax.tick_params(axis="y", labelsize=6)
    return fig


def unit_mean_bars(rho_hat: Tensor, rho: float | None) -> Figure:
    """Per-unit mean activation (rho_hat) on a fixed log axis, against the target rho of a method
    that has one (KL; None: no target line)."""
    fig = _figure(10, 4.5)
    ax = fig.add_subplot()
    units = np.arange(len(rho_hat))
    low, high = UNIT_MEAN_RANGE
    ax.bar(units, rho_hat.clamp(low, high).numpy(), color="steelblue", width=0.8, bottom=0)
    if len(units) <= MAX_UNITS:  # one label per unit while they stay readable
        ax.set_xticks(units)
    ax.set_xlim(-0.6, len(units) - 0.4)
    ax.set_yscale("log")
    ax.set_ylim(low, high)
    if rho is not None:
        ax.axhline(rho, **RHO_STYLE, label=f"target rho = {rho:g}")
    ax.axhline(float(rho_hat.mean()), color="black", linewidth=1, label=f"mean = {float(rho_hat.mean()):.4f}")
    ax.set(xlabel="latent unit", ylabel="mean activation on the test set (rho_hat, log)")
    ax.set_title(f"Per-unit mean activation (min {float(rho_hat.min()):.3g}, max {float(rho_hat.max()):.3g})")
    ax.tick_params(axis="x", labelsize=7)
    ax.legend()
    return fig


def _tiles(
    ax,
    images: np.ndarray,
    ncols: int,
    titles: list[str] | None = None,
    cmap: str = "gray",
    limit: float | None = None,
    marked: list[bool] | None = None,
):
    """Draw 28x28 images as one mosaic on ax, titles above each. Each image is scaled to its own
    range, or with `limit` all share the scale [-limit, limit] (centred at 0). Marked tiles get a
    frame. Returns the image artist (for a colour bar)."""
    n = len(images)
    nrows = int(np.ceil(n / ncols))
    pad_x, pad_y = 2, (10 if titles else 2)
    height, width = nrows * (28 + pad_y), ncols * (28 + pad_x) - pad_x
    mosaic = np.full((height, width), np.nan)
    for i, img in enumerate(images):
        if limit is None:
            lo, hi = img.min(), img.max()
            img = (img - lo) / (hi - lo) if hi > lo else np.zeros_like(img)
        r, c = divmod(i, ncols)
        top, left = r * (28 + pad_y) + pad_y, c * (28 + pad_x)
        mosaic[top : top + 28, left : left + 28] = img.reshape(28, 28)
    shared = {} if limit is None else {"vmin": -limit, "vmax": limit}
    artist = ax.imshow(mosaic, cmap=cmap, interpolation="nearest", **shared)
    ax.set_axis_off()
    for i, title in enumerate(titles or []):
        r, c = divmod(i, ncols)
        ax.text(
            c * (28 + pad_x) + 14, r * (28 + pad_y) + pad_y - 1.5, title, ha="center", va="bottom", fontsize=8
        )
    for i, mark in enumerate(marked or []):
        if mark:
            r, c = divmod(i, ncols)
            top, left = r * (28 + pad_y) + pad_y, c * (28 + pad_x)
            frame = matplotlib.patches.Rectangle(
                (left - 0.5, top - 0.5), 28, 28, fill=False, edgecolor=DEAD_COLOUR, linewidth=1.5
            )
            ax.add_patch(frame)
    return artist


def _heatmap(
    ax,
    table: np.ndarray,
    cmap: str,
    vmax: float,
    label: str,
    xticklabels: list[str] | None = None,
    yticklabels: list[str] | None = None,
) -> None:
    """A table as coloured cells on [0, vmax] with a colour bar: one image (a cell per value), which
    draws in a fraction of the time of a mesh of rectangles. At most MAX_UNITS tick labels a side."""
    rows, cols = table.shape
    artist = ax.imshow(table, cmap=cmap, vmin=0, vmax=vmax, aspect="auto", interpolation="nearest")
    ax.figure.colorbar(artist, ax=ax, label=label)
    for axis, n, names in ((ax.xaxis, cols, xticklabels), (ax.yaxis, rows, yticklabels)):
        ticks = np.arange(n) if n <= MAX_UNITS else np.linspace(0, n - 1, MAX_UNITS // 2).round().astype(int)
        axis.set_ticks(ticks, [names[i] for i in ticks] if names else [str(i) for i in ticks])


def _symmetric_limit(values: Tensor) -> float:
    """A colour limit centred at 0 that outliers do not wash out: the 99.5th percentile of |v|."""
    flat = values.abs().flatten().float()
    if flat.numel() > 1_000_000:
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:1_000_000]]
    return max(float(torch.quantile(flat, 0.995)), 1e-12)


def reconstruction_grid(images: Tensor, recon: Tensor) -> Figure:
    """Test digits (top row) above their reconstructions (bottom row), as one image (one set of
    axes: 2 x n little axes cost most of this figure's drawing)."""
    n, gap = len(images), 2
    mosaic = np.ones((2 * 28 + gap, n * (28 + gap) - gap))  # white between the tiles
    for row, src in enumerate((images, recon)):
        for i in range(n):
            top, left = row * (28 + gap), i * (28 + gap)
            mosaic[top : top + 28, left : left + 28] = src[i].reshape(28, 28).numpy()
    fig = _figure(12, 2.4)
    ax = fig.add_subplot()
    ax.imshow(mosaic, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_xticks([])
    ax.set_yticks([14, 28 + gap + 14], ["original", "reconstruction"], fontsize=8)
    ax.tick_params(axis="y", length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.suptitle(f"{n} test digits: originals (top), reconstructions (bottom)")
    return fig


def encoder_filters(weight: Tensor, dead: Tensor | None = None) -> Figure:
    """First-layer encoder weights, one 28x28 tile per hidden unit, on one diverging scale centred
    at 0 (blue negative, red positive) with a colour bar; units that never fire on the test set are
    framed. At most MAX_TILES units (those with the largest weights), so wide layers stay readable."""
    n = weight.shape[0]
    shown = weight.norm(dim=1).topk(min(n, MAX_TILES)).indices.sort().values
    ncols = 16 if len(shown) > 64 else 8
    fig = _figure(12, 12 * int(np.ceil(len(shown) / ncols)) / ncols + 0.6)
    ax = fig.add_subplot()
    marked = None if dead is None else [bool(dead[j]) for j in shown]
    artist = _tiles(
        ax, weight[shown].numpy(), ncols, cmap="RdBu_r", limit=_symmetric_limit(weight), marked=marked
    )
    fig.colorbar(artist, ax=ax, shrink=0.6, label="weight")
    which = f"{n} units" if len(shown) == n else f"{len(shown)} of {n} units, the largest weights"
    dead_note = "" if dead is None else f"; {int(dead.sum())} never fire on the test set (framed)"
    ax.set_title(f"First-layer encoder filters ({which}{dead_note})")
    return fig


def decoder_images(images: Tensor) -> Figure:
    """What each latent unit writes: the decoder's output with only that unit on (at 1) minus its
    output with every unit off, one tile per unit on a shared diverging scale centred at 0."""
    n = images.shape[0]
    shown = torch.arange(min(n, MAX_TILES))
    ncols = 16 if len(shown) > 64 else 8
    fig = _figure(12, 12 * int(np.ceil(len(shown) / ncols)) * (38 / 30) / ncols + 0.6)
    ax = fig.add_subplot()
    artist = _tiles(
        ax,
        images[shown].numpy(),
        ncols,
        titles=[f"unit {int(j)}" for j in shown],
        cmap="RdBu_r",
        limit=_symmetric_limit(images),
    )
    fig.colorbar(artist, ax=ax, shrink=0.6, label="change in pixel value")
    which = "" if len(shown) == n else f" (the first {len(shown)} of {n} units)"
    ax.set_title(f"Decoder image of each latent unit: decode(unit on) - decode(all off){which}")
    return fig


def feature_density(
    densities: dict[str, Tensor], num_samples: int, rare_below: float, dense_above: float
) -> Figure:
    """Per layer, how often each unit is active on the test set, on a log axis (the feature-density
    histogram of SAE work); units never active are counted apart, as "dead"."""
    fig = _figure(10, 2.6 * len(densities) + 0.6)
    axes = np.atleast_1d(fig.subplots(len(densities), 1, sharex=True))
    low = -np.log10(num_samples) - 0.5  # one sample in the split
    bins = np.linspace(low, 0, 41)
    for ax, (layer, density) in zip(axes, densities.items(), strict=True):
        alive = density[density > 0].double()
        dead = int((density == 0).sum())
        ax.hist(np.log10(alive.numpy()), bins=bins, color="steelblue", label=f"{len(alive)} units")
        if dead:
            ax.bar(low - 0.25, dead, width=0.3, color=DEAD_COLOUR, label=f"{dead} dead (never active)")
        ax.axvline(np.log10(rare_below), **THRESHOLD_STYLE)
        ax.axvline(np.log10(dense_above), **THRESHOLD_STYLE)
        ax.set_ylabel("units")
        ax.set_title(f"{layer}: {len(density)} units", fontsize=10, loc="left")
        ax.legend(fontsize=8, loc="upper left")
    axes[-1].set_xlim(low - 0.5, 0.05)
    axes[-1].set_xlabel(
        f"log10 firing frequency on the test set (dotted: rare < {rare_below:g}, dense > {dense_above:g})"
    )
    fig.suptitle("Feature density: the fraction of test digits on which each unit is active")
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
    top = max(1.0, float(table.max()))  # sigmoid codes: always [0, 1], so runs compare
    _heatmap(ax, table.numpy(), "magma", top, "mean activation", xticklabels=[str(c) for c in classes])
    ax.set(xlabel="digit class", ylabel="latent unit")
    ax.set_title("Mean activation per unit and digit class (test set)")
    ax.tick_params(axis="y", labelsize=7)
    return fig


def write_run_figures(dirpath: Path, inputs: dict[str, Any], events_dir: str | None, step: int) -> None:
    """run_figures(**inputs) to <dirpath>/<name>.png, and with events_dir to TensorBoard there
    (tags visuals/<name>, at the optimizer step `step`), in an event file of their own: this can
    run in a worker process, beside the run's own writer."""
    figures = run_figures(**inputs)
    dirpath.mkdir(parents=True, exist_ok=True)
    writer = None
    if events_dir is not None:
        from torch.utils.tensorboard.writer import FileWriter

        writer = FileWriter(events_dir, filename_suffix=".figures")
    try:
        for name, fig in figures.items():
            png = png_bytes(fig)
            write_atomic(dirpath / f"{name}.png", lambda f, png=png: f.write(png))
            if writer is not None:  # the same PNG: TensorBoard keeps images PNG-encoded
                writer.add_summary(png_image_summary(f"visuals/{name}", png), step)
    finally:
        if writer is not None:
            writer.close()


def png_bytes(fig: Figure) -> bytes:
    """The figure as a PNG file's bytes, its constrained layout computed once: savefig alone
    lays the figure out twice (a layout pass, then the drawing, which lays it out again). The
    pixels are those savefig gives (a test compares them)."""
    engine = fig.get_layout_engine()
    if engine is not None:
        engine.execute(fig)
        with matplotlib.rc_context({"figure.autolayout": False, "figure.constrained_layout.use": False}):
            fig.set_layout_engine(None)  # no engine: the positions just computed stay
    png = io.BytesIO()
    fig.savefig(png, format="png")
    return png.getvalue()


def png_image_summary(tag: str, png: bytes):
    """A TensorBoard image summary holding a PNG file's bytes as they are (SummaryWriter.add_image
    would take pixels and encode them again)."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    width, height = struct.unpack(">II", png[16:24])  # the IHDR chunk, first after the signature
    channels = {0: 1, 2: 3, 4: 2, 6: 4}[png[25]]  # grey, RGB, grey + alpha, RGBA
    image = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=png)
    return Summary(value=[Summary.Value(tag=tag, image=image)])


def run_figures(
    images: Tensor,
    labels: Tensor,
    codes: Tensor,
    reconstructions: Tensor,
    filters: Tensor,
    rho: float | None,
    l0_threshold: float = 0.1,
    densities: dict[str, Tensor] | None = None,
    decoded_units: Tensor | None = None,
    rare_below: float = 1e-3,
    dense_above: float = 0.5,
    setting: str = "",
) -> dict[str, Figure]:
    """All per-run figures of a (test) split of 28x28 images, by file name stem; `setting` (the
    run's knobs) heads each, so that figures of several runs side by side say which is which.

    codes: the latent codes of every image; reconstructions: those of the first few images;
    filters: the first layer's weights, one row per hidden unit; densities: each hidden layer's
    per-unit firing frequency on the split; decoded_units: the decoder image of each latent unit.
    """
    shown = images[: len(reconstructions)]
    first = next(iter(densities.values())) if densities else None
    dead_filters = first == 0 if first is not None and len(first) == len(filters) else None
    figures = {
        "latent_histogram": activation_histogram(codes, l0_threshold),
        "code_heatmap": code_heatmap(codes[:64], labels[:64]),
        "unit_means": unit_mean_bars(codes.mean(dim=0), rho),
        "reconstructions": reconstruction_grid(shown, reconstructions),
        "encoder_filters": encoder_filters(filters, dead_filters),
        "unit_patterns": unit_patterns(images, codes),
        "class_heatmap": class_heatmap(codes, labels),
    }
    if densities:
        figures["feature_density"] = feature_density(densities, len(images), rare_below, dense_above)
    if decoded_units is not None:
        figures["decoder_images"] = decoder_images(decoded_units)
    if setting:
        for fig in figures.values():
            above = fig.get_suptitle()
            fig.suptitle(f"{setting}\n{above}" if above else setting, fontsize=10)
    return figures


# Sweep figures: one point per setting (its jobs' mean over seeds, error bars their sample std).


def _value(setting: dict, key: str) -> float | None:
    value = setting.get(key)
    return float(value) if is_number(value) else None


def _std(setting: dict, key: str) -> float:
    return _value(setting, f"{key}_std") or 0.0


def knob_text(value: object) -> str:
    """A knob's value as a label: as the command typed it where the value carries that (a float
    subclass whose str is its text: sae.report.summary.Typed), a plain float in %g."""
    if isinstance(value, float) and type(value) is float:
        return f"{value:g}"
    return str(value)


def _setting_label(setting: dict, knobs: list[str]) -> str:
    shown = [k for k in knobs if setting.get(k) is not None]  # not a knob of another method only
    parts = [f"{k}={knob_text(setting[k])}" for k in shown]
    return ", ".join(parts) or f"jobs {setting.get('jobs', '')}"


def _baseline_lines(ax, baselines) -> None:
    for baseline, style in zip(baselines, (":", "-."), strict=False):
        ax.axhline(
            baseline["test/mse"],
            color="crimson",
            linestyle=style,
            linewidth=1.2,
            label=f"{baseline['name']}: {baseline['test/mse']:g} "
            f"({baseline['epochs']} epochs, {baseline['train_images'] // 1000}k images)",
        )


def _ring(ax, xs: list[float], ys: list[float], indices: list[int], label: str) -> None:
    """Circle the points at `indices` (a Pareto front) where they are drawn."""
    if indices:
        fx, fy = [xs[i] for i in indices], [ys[i] for i in indices]
        ax.scatter(
            fx, fy, s=160, facecolors="none", edgecolors="darkorange", linewidths=2, zorder=4, label=label
        )


def _by_method(points: list[dict]) -> dict[str, list[dict]]:
    methods: dict[str, list[dict]] = {}
    for s in points:
        methods.setdefault(str(s.get("method", "kl")), []).append(s)
    return methods


def _annotate(ax, points: list[dict], xs, ys, knobs: list[str]) -> None:
    """Label each point with its setting on the side that faces the middle of the points' range,
    so that labels of points at the right or top edge run into the plot, not off it."""
    if not points:
        return
    x_mid, y_mid = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    for s, x, y in zip(points, xs, ys, strict=True):
        left, below = x > x_mid, y > y_mid
        ax.annotate(
            _setting_label(s, knobs),
            (x, y),
            textcoords="offset points",
            xytext=(-4 if left else 4, -4 if below else 4),
            ha="right" if left else "left",
            va="top" if below else "bottom",
            fontsize=7,
        )


def _against_l0(ax, points: list[dict], metric: str, knobs: list[str], minimise: bool) -> None:
    """metric against L0, one colour per method, each method's Pareto frontier drawn (fewer active
    units and a lower metric, or a higher one when not `minimise`)."""
    methods = _by_method(points)
    labelled: list[tuple[dict, float, float]] = []
    for i, (method, members) in enumerate(methods.items()):
        have = [s for s in members if _value(s, "test/l0") is not None and _value(s, metric) is not None]
        xs, ys = [s["test/l0"] for s in have], [s[metric] for s in have]
        alone = len(methods) == 1
        colour = "steelblue" if alone else f"C{i % 10}"
        ax.errorbar(
            xs,
            ys,
            xerr=[_std(s, "test/l0") for s in have],
            yerr=[_std(s, metric) for s in have],
            fmt="o",
            color=colour,
            capsize=3,
            zorder=3,
            label="setting" if alone else method,
        )
        front = pareto_front(xs, ys if minimise else [-y for y in ys])
        ax.plot(
            [xs[j] for j in front],
            [ys[j] for j in front],
            color="darkorange" if alone else colour,
            linewidth=2,
            zorder=2,
            label="Pareto frontier" if alone else f"{method} frontier",
        )
        labelled += [(s, x, y) for s, x, y in zip(have, xs, ys, strict=True)]
    if labelled:  # all methods' points at once: the side a label takes depends on the whole panel
        _annotate(ax, *map(list, zip(*labelled, strict=True)), knobs)


def pareto_figure(settings: list[dict], knobs: list[str], baselines) -> Figure:
    """The truncated code's test MSE against L0 (sae.names.ERROR_AXIS), one colour and
    frontier per sparsity method; probe accuracy against L0;
    and, for KL settings, test MSE against how far rho_hat is from its target rho (the units'
    min..max as bars). The notebook's baselines are drawn on the MSE axes."""
    points = [s for s in settings if _value(s, "test/mse") is not None]
    kl_points = [
        s
        for s in points
        if str(s.get("method", "kl")) == "kl"
        and _value(s, "test/rho_hat_mean") is not None
        and (_value(s, "rho") or 0) > 0
    ]
    with_probe = any(_value(s, "test/probe_accuracy") is not None for s in points)
    several = len(_by_method(points)) > 1
    panels = ["target"] * bool(kl_points) + ["l0"] + ["probe"] * (with_probe and several)
    fig = _figure(7.5 * len(panels), 6.5)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    for ax, panel in zip(axes, panels, strict=True):
        if panel == "target":
            _target_panel(ax, kl_points, knobs, baselines, several)
        elif panel == "l0":
            _error_panel(ax, points, knobs, baselines)
        else:
            _against_l0(ax, points, "test/probe_accuracy", knobs, minimise=False)
            ax.set(
                xlabel="L0: active latent units per digit (lower = sparser)",
                ylabel="linear probe accuracy on the codes (higher = better)",
            )
            ax.set_title("Probe accuracy vs L0")
        ax.grid(True, alpha=0.3)
        ax.margins(x=0.15, y=0.1)  # room for the labels of the outermost points
        ax.legend(fontsize=7, loc="best")
    seeds = any(s.get("n", 1) > 1 for s in points)
    repeats = " (mean over seeds; error bars: one sample std over seeds)" if seeds else ""
    fig.suptitle(f"Sweep: {len(points)} settings{repeats}")
    return fig


def _target_panel(ax, kl_points: list[dict], knobs: list[str], baselines, several: bool) -> None:
    """KL settings: test MSE against rho_hat / rho - 1, the units' min..max as bars."""
    xs = [s["test/rho_hat_mean"] / s["rho"] - 1 for s in kl_points]
    ys = [s["test/mse"] for s in kl_points]
    low = [s.get("test/rho_hat_min", s["test/rho_hat_mean"]) / s["rho"] - 1 for s in kl_points]
    high = [s.get("test/rho_hat_max", s["test/rho_hat_mean"]) / s["rho"] - 1 for s in kl_points]
    ax.errorbar(
        xs,
        ys,
        xerr=[
            [x - lo for x, lo in zip(xs, low, strict=True)],
            [hi - x for x, hi in zip(xs, high, strict=True)],
        ],
        yerr=[_std(s, "test/mse") for s in kl_points],
        fmt="o",
        color="steelblue",
        ecolor="lightsteelblue",
        capsize=3,
        zorder=3,
        label="setting: rho_hat mean; horizontal bar: its units' min..max, not a std",
    )
    # Closest to the target on either side and best MSE, circled where the points are drawn.
    front = pareto_front([abs(x) for x in xs], ys)
    _ring(ax, xs, ys, front, "Pareto frontier (closest to target, best MSE)")
    _annotate(ax, kl_points, xs, ys, knobs)
    ax.axvline(0, **RHO_STYLE, label="rho_hat = rho (on target)")
    published = next((b for b in baselines if "test/rho_hat_mean" in b), None)
    if published is not None:
        ax.scatter(
            [published["test/rho_hat_mean"] / published["rho"] - 1],
            [published["test/mse"]],
            marker="*",
            s=250,
            color="crimson",
            zorder=5,
            label=f"{published['name']} (rho {published['rho']:g})",
        )
    _baseline_lines(ax, baselines)
    ax.set(
        xlabel="rho_hat / rho - 1: mean latent activation relative to its target (0 = on target)",
        ylabel="test MSE (lower = better)",
    )
    title = "Reconstruction vs distance to the sparsity target"
    ax.set_title(f"KL: {title[0].lower()}{title[1:]}" if several else title)


def _error_panel(ax, points: list[dict], knobs: list[str], baselines) -> None:
    """The error of the code L0 counts (sae.core.metrics.truncate_codes) against L0: a dense
    sigmoid code at "L0 7" is held to 7 active units here. Runs from before it: the plain test MSE."""
    error = frontier_axes(points)[1]  # the summary's ranking axis
    truncated = error == ERROR_AXIS
    _against_l0(ax, points, error, knobs, minimise=True)
    if not truncated:  # the notebook's MSEs are of its dense code: not on the truncated axis
        _baseline_lines(ax, baselines)
    ax.set(
        xlabel="L0: active latent units per digit (lower = sparser)",
        ylabel=(
            "test MSE of the code truncated at the L0 threshold (lower = better)"
            if truncated
            else "test MSE (lower = better)"
        ),
    )
    ax.set_title("Reconstruction at the L0 it is plotted at" if truncated else "Reconstruction vs L0")


# The panels of sweep_metrics: title, y label (with what the number counts), then the
# (metric, label) lines drawn in it.
SWEEP_PANELS = (
    (
        "test MSE",
        "mean squared error per pixel (lower = better)",
        (("test/mse", "test/mse"), (ERROR_AXIS, "code truncated at the L0 threshold")),
    ),
    (
        "rho_hat: units' min..mean..max",
        "mean latent activation (dashed: target rho)",
        (("test/rho_hat_mean", "mean"),),
    ),
    ("L0", "active latent units per digit", ((SPARSITY_AXIS, SPARSITY_AXIS),)),
    (
        "dead units (never active on test)",
        "fraction of the layer's units",
        (("test/dead_fraction", "latent"),),
    ),
    (
        "probe accuracy",
        "fraction of test digits classified right",
        (
            ("test/probe_accuracy", "codes"),
            *(
                (m, metric_label(m))
                for m in ("test/probe_accuracy_reconstructions", "test/probe_accuracy_pixels")
            ),
        ),
    ),
)
MAX_SWEEP_ROWS = 3  # swept knobs drawn at most, each its own block of panels
SWEEP_COLUMNS = 3  # panels side by side: the figure stays about 3:2 for one knob
PANEL_SIZE = (4.0, 3.5)  # inches


def sweep_metrics(
    settings: list[dict],
    knobs: list[str],
    label_knobs: list[str] | None = None,
    jobs: dict[str, dict] | None = None,
) -> Figure:
    """Each key metric against each numeric swept knob (a block of panels per knob, at most
    MAX_SWEEP_ROWS, in rows of SWEEP_COLUMNS panels), one line and colour per value of the other
    knobs through the settings' means over seeds; with `jobs` (job rows by job name, as a
    setting's `jobs` lists them) each seed's value as a point, else error bars of one std; dead
    units per layer; the rho_hat band from the units' min to max with the target rho. Without a
    numeric knob, one point per setting, named by `label_knobs` (e.g. model.activation=gelu)."""
    blocks = knobs[:MAX_SWEEP_ROWS] or [None]
    per_block = -(-len(SWEEP_PANELS) // SWEEP_COLUMNS)  # rows of panels per knob
    rows = per_block * len(blocks)
    fig = _figure(PANEL_SIZE[0] * SWEEP_COLUMNS, PANEL_SIZE[1] * rows + 0.9)
    grid = np.atleast_2d(fig.subplots(rows, SWEEP_COLUMNS, squeeze=False))
    layers = sorted(
        {k.split("/")[1] for s in settings for k in s if k.endswith("/dead_fraction") and k.count("/") == 2}
    )
    for b, knob in enumerate(blocks):
        # One line per value of every other swept knob, numeric or not (e.g. +point=..., a method).
        swept = knobs if label_knobs is None else label_knobs
        others = [k for k in swept if k != knob] if knob else []
        groups: dict[str, list[dict]] = {}
        for s in settings:
            groups.setdefault(_setting_label(s, others) if others else "", []).append(s)
        cells = grid[b * per_block : (b + 1) * per_block].flatten()
        for c, ax in enumerate(cells):
            if c >= len(SWEEP_PANELS):
                fig.delaxes(ax)  # the block's empty cells
                continue
            title, ylabel, lines = SWEEP_PANELS[c]
            if c == 3:
                lines = lines + tuple((f"test/{layer}/dead_fraction", layer) for layer in layers)
            lines = [line for line in lines if any(_value(s, line[0]) is not None for s in settings)]
            for g, (group, members) in enumerate(groups.items()):
                ordered = sorted(members, key=lambda s: s.get(knob) if knob else 0)
                _metric_lines(ax, ordered, knob, lines, group, g, jobs)
            ax.set_title(title, fontsize=10)
            ax.set_ylabel(ylabel, fontsize=8)
            ax.grid(True, alpha=0.3)
            _knob_axis(ax, settings, knob, label_knobs)
            if ax.get_legend_handles_labels()[0] and (c in (3, 4) or (c == 0 and (others or len(lines) > 1))):
                ax.legend(fontsize=6, loc="best")
    seeds = any(s.get("n", 1) > 1 for s in settings)
    said = (
        " (points: each seed; lines: their mean)"
        if jobs
        else " (mean over seeds; error bars: one sample std)"
    )
    fig.suptitle("Sweep: key metrics against each swept knob" + (said if seeds else ""))
    return fig


def _metric_lines(
    ax,
    members: list[dict],
    knob: str | None,
    lines: list,
    group: str,
    index: int,
    jobs: dict[str, dict] | None = None,
) -> None:
    """One group's settings (the same values of the other knobs) in one panel: a line per metric
    through the settings' means, in the group's colour, and each seed's value as a point (with
    `jobs`; else error bars of one std); for rho_hat its units' min..max band and the target rho."""
    xs = [s.get(knob) for s in members] if knob else list(range(len(members)))
    colour = f"C{index % 10}"
    for li, (metric, label) in enumerate(lines):
        have = [(x, s) for x, s in zip(xs, members, strict=True) if _value(s, metric) is not None]
        if not have:
            continue
        name = ", ".join(p for p in (group, label if len(lines) > 1 else "") if p)
        ax.errorbar(
            [x for x, _ in have],
            [s[metric] for _, s in have],
            yerr=None if jobs else [_std(s, metric) for _, s in have],
            marker="_" if jobs else "o",  # with the seeds' points: a tick at their mean
            markersize=12 if jobs else 6,
            linestyle=("-", "--", ":", "-.")[li % 4],
            color=colour,
            capsize=3,
            label=name or None,
        )
        seeds = [
            (x, jobs[job][metric])
            for x, s in have
            for job in str(s.get("jobs", "")).split()
            if jobs and job in jobs and _value(jobs[job], metric) is not None
        ]
        if seeds:
            ax.scatter(*zip(*seeds, strict=True), s=14, color=colour, alpha=0.7, zorder=3)
        if metric != "test/rho_hat_mean":
            continue
        low = [_value(s, "test/rho_hat_min") for _, s in have]
        high = [_value(s, "test/rho_hat_max") for _, s in have]
        if None not in low and None not in high:
            ax.fill_between([x for x, _ in have], low, high, color=colour, alpha=0.15)
        if knob == "rho":  # the target moves with x: draw rho_hat = rho
            ax.plot([x for x, _ in have], [x for x, _ in have], **RHO_STYLE)
            continue
        for rho in sorted({s["rho"] for _, s in have if _value(s, "rho") is not None}):
            ax.axhline(rho, **RHO_STYLE)


def _knob_axis(ax, settings: list[dict], knob: str | None, label_knobs: list[str] | None) -> None:
    """The x axis: the knob's values (log-scaled over a decade or more), or one tick per setting."""
    if knob is None:
        names = [_setting_label(s, label_knobs or []) for s in settings]
        ax.set_xticks(range(len(settings)), names, fontsize=7, rotation=20, ha="right")
        return
    values = [s[knob] for s in settings if _value(s, knob) is not None]
    if values and min(values) > 0 and max(values) / min(values) >= 10:
        ax.set_xscale("log")
    ax.set_xlabel(knob)


HEATMAP_METRICS = tuple(  # (metric, title, number format)
    (metric, metric_label(metric), fmt)
    for metric, fmt in (
        ("test/mse", ".4f"),
        (ERROR_AXIS, ".4f"),
        ("test/rho_hat_mean", ".3f"),
        (SPARSITY_AXIS, ".1f"),
        ("test/encoder_1/dead_fraction", ".2f"),
        ("test/probe_accuracy", ".3f"),
    )
)


def seed_consistency(settings: list[dict], knobs: list[str]) -> Figure:
    """Per setting of two or more seeds: how alike its seeds' dictionaries are (the mean cosine of
    each unit with its matched partner in another seed) and the fraction matched above MATCHED_ABOVE."""
    shown = [s for s in settings if _value(s, MATCHED_COSINE) is not None]
    labels = [_setting_label(s, knobs) for s in shown]
    fig = _figure(max(10.0, 1.2 * len(shown) + 4.0), 4.8)
    left, right = fig.subplots(1, 2)
    positions = np.arange(len(shown))
    for ax, metric, ylabel in (
        (left, MATCHED_COSINE, "mean cosine of a unit\nwith its match in another seed"),
        (right, MATCHED_FRACTION, f"fraction of units\nmatched above cosine {MATCHED_ABOVE:g}"),
    ):
        ax.bar(positions, [_value(s, metric) for s in shown], color="steelblue")
        ax.set(ylim=(0, 1), ylabel=ylabel, title=metric)
        ax.set_xticks(positions, labels, rotation=30, ha="right", fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    left.axhline(MATCHED_ABOVE, color="crimson", linestyle="--", label=f"{MATCHED_ABOVE:g}: the same feature")
    left.legend(fontsize=7, loc="lower right")
    fig.suptitle("Do the seeds find the same dictionary? (units paired one to one, Hungarian matching)")
    return fig


def sweep_heatmaps(settings: list[dict], knob_x: str, knob_y: str) -> Figure:
    """A two-knob grid as heatmaps, one per key metric (means over seeds)."""
    xs = sorted({s[knob_x] for s in settings})
    ys = sorted({s[knob_y] for s in settings})
    shown = [m for m in HEATMAP_METRICS if any(_value(s, m[0]) is not None for s in settings)]
    fig = _figure(4.2 * len(shown), 0.45 * len(ys) + 2.4)
    axes = np.atleast_1d(fig.subplots(1, len(shown)))
    for ax, (metric, title, fmt) in zip(axes, shown, strict=True):
        grid = np.full((len(ys), len(xs)), np.nan)
        relative = metric == "test/rho_hat_mean"  # shown as the distance to each setting's target
        for s in settings:
            if _value(s, metric) is not None and (not relative or (_value(s, "rho") or 0) > 0):
                value = s[metric] / s["rho"] - 1 if relative else s[metric]
                grid[ys.index(s[knob_y]), xs.index(s[knob_x])] = value
        limit = float(np.nanmax(np.abs(grid))) if relative and np.isfinite(grid).any() else 1.0
        colours = {"cmap": "RdBu_r", "vmin": -limit, "vmax": limit} if relative else {"cmap": "viridis"}
        sns.heatmap(
            grid,
            annot=len(xs) * len(ys) <= 64,
            fmt=fmt,
            **colours,
            ax=ax,
            cbar=True,
            xticklabels=[knob_text(v) for v in xs],
            yticklabels=[knob_text(v) for v in ys],
            annot_kws={"fontsize": 7},
        )
        ax.set(xlabel=knob_x, ylabel=knob_y, title=title)
    fig.suptitle(f"Sweep grid: {knob_y} x {knob_x} (mean over seeds)")
    return fig


def methods_at_l0(table: list[dict]) -> Figure:
    """Methods at equal L0 (sae.report.equal_l0): the truncated code's test MSE and the probe
    accuracy against the L0 each method reached at each target, one line per method; bars: 95%
    confidence intervals over seeds (both axes). Targets as dotted verticals; L0 on a log axis."""
    from sae.report.equal_l0 import PROBE

    panels = [(ERROR_AXIS, "lower = better")]
    if any(_value(r, PROBE) is not None for r in table):
        panels.append((PROBE, "higher = better"))
    fig = _figure(7.5 * len(panels), 6.0)
    axes = np.atleast_1d(fig.subplots(1, len(panels)))
    targets = sorted({r["target_l0"] for r in table})
    for ax, (metric, direction) in zip(axes, panels, strict=True):
        for i, (method, members) in enumerate(_by_method(table).items()):
            have = [
                r for r in members if _value(r, metric) is not None and _value(r, SPARSITY_AXIS) is not None
            ]
            have.sort(key=lambda r: r["target_l0"])
            ax.errorbar(
                [r[SPARSITY_AXIS] for r in have],
                [r[metric] for r in have],
                xerr=[np.nan_to_num(_value(r, f"{SPARSITY_AXIS}_ci") or 0.0) for r in have],
                yerr=[np.nan_to_num(_value(r, f"{metric}_ci") or 0.0) for r in have],
                fmt="o-",
                color=f"C{i % 10}",
                capsize=3,
                label=method,
            )
        for target in targets:
            ax.axvline(target, color="grey", linestyle=":", linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xticks(targets, [f"{t:g}" for t in targets])
        ax.set(
            xlabel="L0 reached: active latent units per digit (dotted: the targets)",
            ylabel=f"{metric_label(metric)} ({direction})",
        )
        ax.set_title(f"{metric} at equal L0")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    seeds = max((r.get("n", 1) for r in table), default=1)
    fig.suptitle(f"Sparsity methods at equal L0: mean over {seeds} seeds, bars 95% confidence intervals")
    return fig
