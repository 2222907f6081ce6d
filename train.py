"""Train a sparse autoencoder: `python train.py [overrides]`, or a sweep with `-m`.

The pipeline is sae.training.fit.train(cfg); this wrapper composes the config, turns errors a
researcher can fix into one line, and returns the optimized metric to sweepers (Optuna).
"""

from __future__ import annotations

from sae.cli import choose_openmp_spin, start_process

start_process()  # the config resolvers, before Hydra composes

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from sae.config import validate_train_config  # noqa: E402
from sae.errors import JobFailed  # noqa: E402
from sae.run.commands import in_multirun, run_app, run_command  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | JobFailed | None:
    metrics = run_command(lambda: checked_then_trained(cfg))
    return metrics if isinstance(metrics, JobFailed) else metrics.get(cfg.optimized_metric)


def checked_then_trained(cfg: DictConfig) -> dict:
    """The config is checked before Lightning and torch are imported (seconds of imports), so a
    mistyped setting is answered at once; train() checks it again as it settles the run. OpenMP's
    spin is chosen before torch loads it, from whether the cores are shared."""
    validate_train_config(cfg)
    choose_openmp_spin(sweep=in_multirun())
    # Imported here, not above: a sweep's figure worker (sae.run.handoff, spawned) imports this
    # file and needs none of Lightning.
    from sae.training.fit import train

    return train(cfg)


if __name__ == "__main__":
    run_app(main, "train")
