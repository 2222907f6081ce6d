"""Test a checkpoint, or summarise a sweep folder.

    python evaluate.py ckpt_path=PATH [data.root=...]   test metrics, figures, metrics.json
    python evaluate.py sweep_dir=PATH                    summary.csv, summary.md, pareto.png

A checkpoint's model is rebuilt from its own hyperparameters; the test metrics are printed and
written to metrics.json in this command's output folder, with the same `test/*` keys as train.py.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import hydra
from hydra.utils import instantiate
from omegaconf import DictConfig

from sae.data import DataError
from sae.io import format_metrics, write_json_atomic
from sae.module import CheckpointError, load_checkpoint
from sae.pipeline import build_trainer, run_test


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the test split through the checkpoint's model; write and return the metrics."""
    module, trained_on = load_checkpoint(cfg.ckpt_path)
    # The probe fits on the training split: use the split the model was trained with.
    split = {k: trained_on[k] for k in ("val_size", "split_seed") if k in trained_on}
    datamodule = instantiate(cfg.data, **split)
    metrics: dict[str, Any] = run_test(build_trainer(cfg), module, datamodule)
    metrics["ckpt_path"] = str(Path(cfg.ckpt_path).resolve())
    write_json_atomic(Path(cfg.output_dir) / "metrics.json", metrics)
    print(format_metrics(metrics))
    return metrics


def summarise(sweep_dir: str) -> None:
    from sae.sweep import job_dirs, write_summary

    path = Path(sweep_dir)
    if not path.is_dir() or not job_dirs(path):
        raise FileNotFoundError(f"sweep_dir={sweep_dir} holds no job folders (<job>/.hydra/config.yaml)")
    rows = write_summary(path)
    ok = sum(r["status"] == "ok" for r in rows)
    print(f"{len(rows)} jobs ({ok} ok): wrote summary.csv, summary.md and pareto.png in {path}")


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        if cfg.sweep_dir:
            summarise(cfg.sweep_dir)
        elif cfg.ckpt_path:
            evaluate(cfg)
        else:
            sys.exit("error: pass ckpt_path=<run>/checkpoints/<name>.ckpt or sweep_dir=<multirun folder>")
    except (CheckpointError, DataError, FileNotFoundError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
