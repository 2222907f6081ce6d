"""Test a checkpoint: `python evaluate.py ckpt_path=PATH [data.root=...]`.

Prints the test metrics as a table and writes them to metrics.json in this command's own output
folder, with the same `test/*` keys as train.py.
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


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run the test split through the checkpoint's model; write and return the metrics."""
    module = load_checkpoint(cfg.ckpt_path)
    datamodule = instantiate(cfg.data)
    trainer = instantiate(cfg.trainer)
    results = trainer.test(module, datamodule=datamodule, verbose=False)
    metrics: dict[str, Any] = {k: float(v) for k, v in results[0].items()}
    metrics["ckpt_path"] = str(Path(cfg.ckpt_path).resolve())
    write_json_atomic(Path(cfg.output_dir) / "metrics.json", metrics)
    print(format_metrics(metrics))
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        evaluate(cfg)
    except (CheckpointError, DataError) as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
