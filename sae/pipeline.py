"""Pieces train.py and evaluate.py share: building a Trainer from config, and testing a model."""

from __future__ import annotations

import os
import warnings
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
    # The module writes train/* every log_every_n_steps optimizer steps, however many batches each
    # training call holds; Lightning's warning compares that number with the calls per epoch.
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than")
    trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **overrides)
    cheap_cuda_checks_without_gpus()
    return trainer


def cheap_cuda_checks_without_gpus() -> None:
    """Undo Lightning's PYTORCH_NVML_BASED_CUDA_CHECK=1 on a machine that has no GPU.

    Lightning sets it at import so that asking whether CUDA is available cannot spoil fork().
    torch.optim.Adam asks on every step, and with no GPU the NVML route loads the NVML library
    again each time: about 0.1 ms, 7-10% of a CPU step of the default model (measured with
    CUDA builds of torch, the ones pip installs by default). With no GPU there is nothing for
    fork to spoil, and the plain check takes about 2 us.
    """
    if os.environ.get("PYTORCH_NVML_BASED_CUDA_CHECK") == "1" and torch.cuda.device_count() == 0:
        del os.environ["PYTORCH_NVML_BASED_CUDA_CHECK"]


def run_test(
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    ckpt_path: str | None = None,
) -> dict[str, float]:
    """Test metrics (and whatever the callbacks log at test time) as plain floats."""
    results = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
    axes = ("step", "epoch")  # where the loggers put the metrics, not metrics themselves
    return {k: float(v) for k, v in results[0].items() if k not in axes}


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written beside their target and renamed over it, so a crash mid-save never
    leaves half a last.ckpt (Lightning's own save stages in the temp folder and copies across
    file systems when that is another one)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        write_atomic(path, lambda f: torch.save(checkpoint, f))
