"""`evaluate(cfg)`: test a checkpoint; `summarise(sweep_dir)`: rebuild a sweep's summary files."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig

from sae.atomic import write_json_atomic
from sae.checkpoints import load_checkpoint
from sae.config import ConfigError, without_retired_keys
from sae.console import UserError, closing_lines, format_metrics, report, tidy_library_output
from sae.data import MNISTDataModule
from sae.training import build_trainer, run_test, use_thread_count

# Data settings a model was trained with, which its evaluation reuses: the probe fits on the
# training split the model was trained on. Where the data comes from is the command line's.
TRAINING_DATA_SETTINGS = ("val_size", "split_seed", "seed", "batch_size")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the test split through the checkpoint's model; write and return the metrics."""
    tidy_library_output()
    use_thread_count(cfg)  # the run's own count (fit/threads) reproduces its probe exactly
    module, trained_on = load_checkpoint(cfg.ckpt_path)
    defaults = inspect.signature(MNISTDataModule).parameters
    settings = {}
    for key in TRAINING_DATA_SETTINGS:
        saved, given = trained_on.get(key, defaults[key].default), cfg.data.get(key)
        if given is not None and given != saved:
            raise ConfigError(
                f"data.{key}={given}: evaluate.py uses the checkpoint's data.{key}={saved} "
                "(how the model was trained); leave it unset"
            )
        settings[key] = saved
    datamodule = instantiate(without_retired_keys(cfg.data, "data"), **settings)
    metrics: dict[str, Any] = run_test(build_trainer(cfg), module, datamodule)
    metrics["ckpt_path"] = str(Path(cfg.ckpt_path).resolve())
    write_json_atomic(Path(cfg.output_dir) / "metrics.json", metrics)
    report(format_metrics(metrics))
    report(closing_lines(Path(cfg.output_dir)))
    return metrics


def summarise(sweep_dir: str | Path) -> None:
    """summary.csv, summary.md and pareto.png of a sweep folder, from its job folders alone."""
    from sae.sweep import job_dirs, write_summary

    path = Path(sweep_dir)
    if not path.is_dir() or not job_dirs(path):
        raise UserError(f"sweep_dir={sweep_dir} holds no job folders (<job>/.hydra/config.yaml)")
    report(write_summary(path).closing_lines())
