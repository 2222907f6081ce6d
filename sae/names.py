"""What a metric's name says about it, written once: its split, which way is better, and whether
it compares across settings.

Names are `<split>/<metric>`: `train/`, `val/`, `test/` (and `fit/` for the run's cost). A sweeper
selects on the validation split only; the test split is reported, never selected on.
"""

from __future__ import annotations

SELECTION_SPLIT = "val/"
HIGHER_IS_BETTER = ("accuracy",)  # metric names containing these are maximised; every other is an error
# The frontier the summary ranks by and the figures draw: the error of the code the decoder would
# see with only the units L0 counts active (sae.core.metrics.truncate_codes), against that L0.
SPARSITY_AXIS = "test/l0"
ERROR_AXIS = "test/truncated_mse"
FRONTIER_AXES = (SPARSITY_AXIS, ERROR_AXIS)


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
