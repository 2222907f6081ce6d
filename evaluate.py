"""Test a checkpoint, or summarise a sweep folder.

    python evaluate.py ckpt_path=PATH [data.root=...]   test metrics, figures, metrics.json
    python evaluate.py sweep_dir=PATH                    summary.csv, summary.md, pareto.png
    python evaluate.py compare_runs=[RUN,RUN,...]        how alike the runs' dictionaries are

The work is in sae.training.evaluate; this wrapper composes the config and reports errors in one line.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

from sae.cli import choose_openmp_spin, start_process

start_process()  # the config resolvers, before Hydra composes

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from sae.config import check_checkpoint_file, validate_evaluate_config  # noqa: E402
from sae.report.summary import sweep_jobs  # noqa: E402
from sae.run.commands import run_app, run_command  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    # Lightning and torch are imported after the config and the checkpoint's path are checked
    # (seconds of imports): a mistyped setting or path is answered at once.
    if cfg.sweep_dir:
        try:
            run_command(lambda: summarise(cfg))
        finally:  # everything went into the sweep folder: leave no empty run folder behind
            shutil.rmtree(Path(HydraConfig.get().runtime.output_dir), ignore_errors=True)
    elif cfg.ckpt_path:
        run_command(lambda: evaluate(cfg))
    elif cfg.compare_runs:
        try:
            run_command(lambda: compare_runs(cfg))
        finally:  # it prints and writes nothing: no empty run folder
            shutil.rmtree(Path(HydraConfig.get().runtime.output_dir), ignore_errors=True)
    else:
        sys.exit(
            "error: pass ckpt_path=<run>/checkpoints/<name>.ckpt, sweep_dir=<multirun folder> "
            "or compare_runs=[<run>,<run>]"
        )


def summarise(cfg: DictConfig) -> None:
    validate_evaluate_config(cfg)
    sweep_jobs(cfg.sweep_dir)
    choose_openmp_spin(sweep=False)  # before torch loads
    from sae.training.evaluate import summarise

    summarise(cfg.sweep_dir)


def compare_runs(cfg: DictConfig) -> None:
    validate_evaluate_config(cfg)
    from sae.report.consistency import compare_runs

    print(compare_runs([Path(p) for p in cfg.compare_runs]))


def evaluate(cfg: DictConfig) -> None:
    validate_evaluate_config(cfg)
    check_checkpoint_file(cfg.ckpt_path)
    choose_openmp_spin(sweep=False)  # before torch loads
    from sae.training.evaluate import evaluate

    evaluate(cfg)


if __name__ == "__main__":
    run_app(main, "evaluate")
