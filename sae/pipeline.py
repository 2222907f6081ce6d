"""Pieces train.py and evaluate.py share: building a Trainer from config, and testing a model."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar
from lightning.pytorch.plugins import TorchCheckpointIO
from omegaconf import DictConfig

from sae.io import write_atomic


def build_trainer(cfg: DictConfig, **overrides: Any) -> L.Trainer:
    """A Trainer from cfg.trainer with the configured callbacks and loggers."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar it was told not to show
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    return instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **overrides)


def run_test(
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    ckpt_path: str | None = None,
) -> dict[str, float]:
    """Test metrics (and whatever the callbacks log at test time) as plain floats."""
    results = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
    return {k: float(v) for k, v in results[0].items()}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written beside their target and renamed over it, so a crash mid-save never
    leaves half a last.ckpt (Lightning's own save stages in the temp folder and copies across
    file systems when that is another one)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        write_atomic(path, lambda f: torch.save(checkpoint, f))
