"""`evaluate(cfg)`: test a checkpoint; `summarise(sweep_dir)`: rebuild a sweep's summary files."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import lightning as L
from omegaconf import DictConfig

from sae.config import (
    DATA_RULES,
    DATA_TARGET,
    ConfigError,
    check_settings,
    data_settings,
    group_settings,
    validate_evaluate_config,
)
from sae.data.mnist import MNISTDataModule
from sae.errors import UserError
from sae.report.probe import ProbeData, probe_accuracies, probe_settings
from sae.run.console import closing_lines, format_metrics, report, tidy_library_output
from sae.run.folder import writing_run_folder
from sae.run.record import RunRecord, plain_numbers
from sae.training.callbacks import RunFigures, record_metrics
from sae.training.checkpoints import load_checkpoint, module_from_checkpoint, read_checkpoint
from sae.training.fit import build_trainer, run_test, use_thread_count
from sae.training.loggers import run_events_folder
from sae.training.resume import recorded_config

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
        metrics.update({f"fit/{k}": v for k, v in module.fit_record().items()})
        metrics["ckpt_path"] = str(Path(cfg.ckpt_path).resolve())
        metrics = plain_numbers(metrics)  # as metrics.json records them
        RunRecord(output_dir).evaluated(metrics)
    report(format_metrics(metrics))
    report(closing_lines(output_dir))
    return metrics


def evaluation_data_settings(cfg: DictConfig, trained_on: dict[str, Any]) -> dict[str, Any]:
    """The data module's arguments for evaluating a checkpoint: where the data is and how to batch
    the test from the command line; how the model was trained (TRAINING_DATA_SETTINGS) from the
    checkpoint (checked by sae.training.checkpoints.saved_settings), never from both."""
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
    """summary.csv, summary.md and pareto.png of a sweep folder, from its job folders alone; first,
    each job's results that its status says are missing are computed (complete_run)."""
    from sae.report.summary import sweep_jobs, write_summary

    for job in sweep_jobs(sweep_dir):
        if done := complete_run(job):
            report(f"job {job.name}: completed its {', '.join(done)}")
    report(write_summary(Path(sweep_dir)).closing_lines())


# A sweep job's results that may be computed after it (sae.run.handoff): the code and pixel probes,
# and the figures.
HANDED_OFF_RESULTS = ("probes", "figures")


def complete_run(job: Path) -> list[str]:
    """Compute the results a job's status.json says are missing (its probes, its figures: handed to
    a sweep's worker that was killed, or whose sweep stopped first) from its tested checkpoint, as
    the job would have: into its metrics.json, plots/ and TensorBoard events. Then the job is "ok".
    Returns the results it completed."""
    from sae.run.handoff import more_jobs_follow

    record = RunRecord(job)
    status = record.status()
    missing = status.get("missing")
    if status.get("status") != "incomplete" or not isinstance(missing, list):
        return []
    missing = [m for m in HANDED_OFF_RESULTS if m in missing]
    if not missing or more_jobs_follow():
        return []
    with writing_run_folder(job):
        metrics = record.metrics()
        ckpt_path = tested_checkpoint(job, metrics)
        cfg = recorded_config(job)
        ckpt = read_checkpoint(ckpt_path)
        module, trained_on = module_from_checkpoint(ckpt_path, ckpt)
        step = ckpt.get("global_step")
        step = step if isinstance(step, int) and not isinstance(step, bool) else 0
        kept = {k: trained_on[k] for k in TRAINING_DATA_SETTINGS if k in trained_on}
        datamodule = MNISTDataModule(**(data_settings(cfg) | kept))
        threads = metrics.get("fit/threads")  # the job's own count reproduces its probe exactly
        threads = (
            threads if isinstance(threads, int) and not isinstance(threads, bool) and threads >= 1 else None
        )
        events = run_events_folder(job)
        events_dir = str(events) if events is not None else None
        if "probes" in missing:
            data = ProbeData(*datamodule.split("train"), *datamodule.split("test"))
            settings = probe_settings(cfg.callbacks.linear_probe)
            values = probe_accuracies(module.net, data, **settings, threads=threads)
            record_metrics(job, events_dir, step, values)
            record.result_done("probes")
        if "figures" in missing:
            figures = RunFigures(str(job / "plots"), events_dir=events_dir, step=step)
            trainer = L.Trainer(
                accelerator="cpu",
                logger=False,
                callbacks=[figures],
                enable_progress_bar=False,
                enable_model_summary=False,
                default_root_dir=str(job),
            )
            trainer.test(module, datamodule=datamodule, verbose=False)
            record.result_done("figures")
    return missing


def tested_checkpoint(run: Path, metrics: dict[str, Any]) -> Path:
    """The checkpoint a run tested (its metrics.json's ckpt_path), taken by name in the run's own
    checkpoints/ folder: a run folder moved or copied since still reads its own files, and no path
    a file names outside the run is ever loaded."""
    named = metrics.get("ckpt_path")
    path = run / "checkpoints" / Path(named).name if isinstance(named, str) and named else None
    if path is None or not path.is_file():
        raise UserError(
            f"{RunRecord(run).metrics_file}: its tested checkpoint ckpt_path={named!r} is not in "
            f"{run / 'checkpoints'}"
        )
    return path
