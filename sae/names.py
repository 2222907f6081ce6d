"""The names a researcher reads, written once: metrics (their split, which way is better, whether
they compare across settings, the order they are shown in, their labels) and the swept knobs.

The console, the sweep summary, TensorBoard's HParams tab and the figures all read them from here.
Metric names are `<split>/<metric>`: `train/`, `val/`, `test/` (and `fit/` for the run's cost). A
sweeper selects on the validation split only; the test split is reported, never selected on.
"""

from __future__ import annotations

SELECTION_SPLIT = "val/"
SIGNIFICANT_DIGITS = 5  # of every metric shown: the console, summary.md, the closing lines


def metric_text(value: float) -> str:
    """A metric as the console and the sweep's tables show it (summary.csv keeps every digit)."""
    return f"{value:.{SIGNIFICANT_DIGITS}g}"


HIGHER_IS_BETTER = ("accuracy",)  # metric names containing these are maximised; every other is an error
# The frontier the summary ranks by and the figures draw: the error of the code the decoder would
# see with only the units L0 counts active (sae.core.metrics.truncate_codes), against that L0.
SPARSITY_AXIS = "test/l0"
ERROR_AXIS = "test/truncated_mse"
FRONTIER_AXES = (SPARSITY_AXIS, ERROR_AXIS)

# Per setting of two or more seeds: whether they found the same dictionary (sae.report.consistency).
MATCHED_COSINE, MATCHED_FRACTION = "seeds/matched_cosine", "seeds/matched_above_0.9"

# What each metric is, in the words of a figure's axis or a heatmap's title.
LABELS = {
    "test/truncated_mse": "test MSE, code truncated at L0",
    "test/mse": "test MSE",
    "test/l0": "L0",
    "test/fvu": "fraction of variance unexplained",
    "test/dead_fraction": "dead fraction",
    "test/encoder_1/dead_fraction": "encoder_1 dead fraction",
    "test/rho_hat_mean": "rho_hat mean",
    "test/rho_hat_min": "rho_hat min",
    "test/rho_hat_max": "rho_hat max",
    "test/probe_accuracy": "probe accuracy",
    "test/probe_accuracy_reconstructions": "pixel classifier on reconstructions",
    "test/probe_accuracy_pixels": "pixel classifier on originals",
    MATCHED_COSINE: "seeds' units matched: mean cosine",
    MATCHED_FRACTION: "seeds' units matched above cosine 0.9",
}
# The metrics a reader compares first, in this order (those that compare across settings, then
# val/loss, which holds beta * the penalty): the summary's columns, then the rest alphabetically.
COMPARED_FIRST = (
    ERROR_AXIS,
    "test/mse",
    SPARSITY_AXIS,
    "test/fvu",
    "test/dead_fraction",
    "test/encoder_1/dead_fraction",
    "test/rho_hat_mean",
    "test/rho_hat_min",
    "test/rho_hat_max",
    "test/probe_accuracy",
    "test/probe_accuracy_reconstructions",
    MATCHED_COSINE,
    MATCHED_FRACTION,
    "fit/auxk_dead",
    "fit/auxk_revived",
    "val/loss",
)
RUN_COST = ("fit/seconds", "fit/stacked_jobs", "fit/stacked_seconds")  # in summary.md beside COMPARED_FIRST
# What a sweep command's closing lines show for its best jobs.
CLOSING = (ERROR_AXIS, "test/mse", SPARSITY_AXIS, "test/dead_fraction", "test/probe_accuracy")
# What TensorBoard's HParams tab shows beside each run's settings, in the order the summary ranks
# and shows them (it ticks the first five), then the test loss.
HPARAMS = (*(m for m in COMPARED_FIRST if m.startswith("test/")), "test/loss")

# The swept knobs. Those that change the training objective itself: across them val/loss (which
# contains beta * the penalty) ranks jobs by their objective, not by how well they reconstruct.
OBJECTIVE_KNOBS = ("rho", "beta", "latent_dim", "sparsity", "k", "target_l0")
SEED_KNOBS = ("seed",)  # jobs that differ only in these repeat one setting


def label(name: str) -> str:
    """A metric's words for a reader (its name where it has none)."""
    return LABELS.get(name, name)


def higher_is_better(name: str) -> bool:
    return any(word in name for word in HIGHER_IS_BETTER)


def direction(name: str) -> str:
    """The study direction a sweeper optimises `name` in: 'maximize' or 'minimize'."""
    return "maximize" if higher_is_better(name) else "minimize"


def within_setting(name: str) -> bool:
    """Whether the metric holds beta times the sparsity penalty (`val/loss`): it compares runs of
    one setting (an lr or seed search), not runs that differ in beta, rho or method."""
    return name.endswith("/loss")


def selectable(name: object) -> bool:
    """Whether a sweeper may select on it: a validation metric, or none (null)."""
    if name is None:
        return True
    return isinstance(name, str) and name.startswith(SELECTION_SPLIT) and name != SELECTION_SPLIT


def register_resolvers() -> None:
    """`${metric_direction:${optimized_metric}}`: how conf/hparams_search/optuna.yaml sets the
    study's direction from the metric. Registered by the entry scripts (sae.cli.start_process)
    before Hydra composes their config."""
    from omegaconf import OmegaConf

    OmegaConf.register_new_resolver("metric_direction", direction, replace=True)
