"""`evaluate(cfg)`: test a checkpoint; `summarise(sweep_dir)`: rebuild a sweep's summary files."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from sae.atomic import write_json_atomic
from sae.checkpoints import load_checkpoint
from sae.config import (
    DATA_RULES,
    DATA_TARGET,
    ConfigError,
    check_settings,
    group_settings,
    validate_evaluate_config,
)
from sae.console import UserError, closing_lines, format_metrics, report, tidy_library_output
from sae.data import MNISTDataModule
from sae.run_folder import writing_run_folder
from sae.training import build_trainer, run_test, use_thread_count

# Data settings a model was trained with, which its evaluation reuses: the probe fits on the
# training split the model was trained on. Where the data comes from is the command line's.
TRAINING_DATA_SETTINGS = ("val_size", "split_seed", "seed", "batch_size")


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the test split through the checkpoint's model; write and return the metrics.

    The output folder is locked as train.py locks its run folder: two evaluations writing to one
    folder would both report success and leave one metrics.json.
    """
    tidy_library_output()
    validate_evaluate_config(cfg)
    output_dir = Path(cfg.output_dir)
    with writing_run_folder(output_dir):
        use_thread_count(cfg)  # the run's own count (fit/threads) reproduces its probe exactly
        module, trained_on = load_checkpoint(cfg.ckpt_path)
        datamodule = MNISTDataModule(**evaluation_data_settings(cfg, trained_on))
        metrics: dict[str, Any] = run_test(build_trainer(cfg), module, datamodule)
        metrics["ckpt_path"] = str(Path(cfg.ckpt_path).resolve())
        write_json_atomic(output_dir / "metrics.json", metrics)
    report(format_metrics(metrics))
    report(closing_lines(output_dir))
    return metrics


def evaluation_data_settings(cfg: DictConfig, trained_on: dict[str, Any]) -> dict[str, Any]:
    """The data module's arguments for evaluating a checkpoint: where the data is and how to batch
    the test from the command line; how the model was trained (TRAINING_DATA_SETTINGS) from the
    checkpoint (checked by sae.checkpoints.saved_settings), never from both."""
    settings = group_settings(cfg, "data", DATA_TARGET)
    defaults = inspect.signature(MNISTDataModule).parameters
    for key in TRAINING_DATA_SETTINGS:
        saved, given = trained_on.get(key, defaults[key].default), settings.get(key)
        if given is not None and given != saved:
            raise ConfigError(
                f"data.{key}={given}: evaluate.py uses the checkpoint's data.{key}={saved} "
                "(how the model was trained); leave it unset"
            )
        settings[key] = saved
    check_settings(settings, DATA_RULES, lambda key: f"data.{key}", "the data")
    return settings


def summarise(sweep_dir: str | Path) -> None:
    """summary.csv, summary.md and pareto.png of a sweep folder, from its job folders alone."""
    from sae.sweep import job_dirs, write_summary

    path = Path(sweep_dir)
    if not path.is_dir() or not job_dirs(path):
        raise UserError(f"sweep_dir={sweep_dir} holds no job folders (<job>/.hydra/config.yaml)")
    report(write_summary(path).closing_lines())
