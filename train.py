"""Train a sparse autoencoder: `python train.py [overrides]`, or a sweep with `-m`.

The pipeline is sae.training.train(cfg); this wrapper composes the config, turns errors a
researcher can fix into one line, and returns the optimized metric to sweepers (Optuna).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from sae.console import JobFailed, run_app, run_command


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | JobFailed | None:
    # Imported here: a sweep's figure worker (sae.background, spawned) imports this file, and
    # needs none of Lightning.
    from sae.training import train

    metrics = run_command(lambda: train(cfg))
    return metrics if isinstance(metrics, JobFailed) else metrics.get(cfg.optimized_metric)


if __name__ == "__main__":
    run_app(main, "train")
