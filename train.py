"""Train a sparse autoencoder: `python train.py [overrides]`, or a sweep with `-m`.

`train(cfg)` is the whole pipeline and is what tests call in-process; `main` is a thin Hydra
wrapper that returns the optimized metric to sweepers.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig

from sae.config import ConfigError, validate_train_config
from sae.data import DataError
from sae.io import format_metrics, write_json_atomic
from sae.module import CheckpointError
from sae.pipeline import build_trainer, run_test


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test the best checkpoint, and write <output_dir>/metrics.json; return its contents."""
    validate_train_config(cfg)
    output_dir = Path(cfg.output_dir)
    if cfg.get("ckpt_path") and not Path(cfg.ckpt_path).is_file():
        raise CheckpointError(
            f"ckpt_path={cfg.ckpt_path} is not a file (expected <run>/checkpoints/last.ckpt)"
        )
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model)
    # No validation split (e.g. experiment=seed_notebook): nothing to validate or monitor.
    trainer = build_trainer(cfg, **({"limit_val_batches": 0} if cfg.data.val_size == 0 else {}))

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"))
    fit_seconds = time.perf_counter() - start

    checkpoint = trainer.checkpoint_callback
    tested = None
    if checkpoint is not None:
        tested = checkpoint.best_model_path or checkpoint.last_model_path or None
    metrics: dict[str, Any] = run_test(trainer, module, datamodule, ckpt_path=tested)
    if checkpoint is not None and checkpoint.best_model_score is not None:
        metrics[checkpoint.monitor] = float(checkpoint.best_model_score)
    metrics["fit/seconds"] = fit_seconds
    metrics["fit/epochs"] = trainer.current_epoch
    metrics["ckpt_path"] = str(Path(tested).resolve()) if tested else None
    write_json_atomic(output_dir / "metrics.json", metrics)
    print(format_metrics(metrics))
    return metrics


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except (ConfigError, DataError, CheckpointError) as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra records the job as failed and the sweep goes on with the others
        kind = "config error" if isinstance(err, ConfigError) else "error"
        sys.exit(f"{kind}: {err}")  # one line, no traceback: the message says what to fix
    return metrics.get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
