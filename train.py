"""Train a sparse autoencoder: `python train.py [overrides]`, or a sweep with `-m`.

`train(cfg)` is the whole pipeline and is what tests call in-process; `main` is a thin Hydra
wrapper that returns the optimized metric to sweepers.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.types import RunMode
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from sae.config import ConfigError, validate_train_config
from sae.data import DataError
from sae.io import format_metrics, one_line, write_json_atomic
from sae.module import ARCHITECTURE, CheckpointError, TrainingDiverged, read_checkpoint
from sae.pipeline import build_trainer, run_test
from sae.vectorized import JobRecord, attach_replay


def train(cfg: DictConfig, replay: JobRecord | None = None) -> dict[str, Any]:
    """Fit, test the best checkpoint, and write <output_dir>/metrics.json; return its contents.

    With `replay` (the vectorized launcher) the training epochs come from a stacked run's record
    instead of being computed here; everything else is the same.
    """
    validate_train_config(cfg)
    resume_from = checkpoint_to_resume(cfg)
    if cfg.get("resume"):  # continue the run in its own folder: checkpoints, TensorBoard, metrics
        cfg.output_dir = str(Path(cfg.resume).resolve())
        print(f"resuming {cfg.output_dir} from checkpoints/last.ckpt")
    output_dir = Path(cfg.output_dir)
    if cfg.get("threads"):  # e.g. a share of the cores when several jobs run at once
        torch.set_num_threads(cfg.threads)
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = instantiate(cfg.data)
    module = instantiate(cfg.model)
    if replay is not None:
        module = attach_replay(replay, module, datamodule)
    # No validation split (e.g. experiment=seed_notebook): nothing to validate or monitor.
    trainer = build_trainer(cfg, **({"limit_val_batches": 0} if cfg.data.val_size == 0 else {}))

    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
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
    metrics["fit/threads"] = torch.get_num_threads()
    if replay is not None:  # the stacked fit, shared by its jobs, then this job's replay
        metrics["fit/seconds"] += replay.stacked_seconds
        metrics["fit/stacked_jobs"] = replay.stacked_jobs
    metrics["ckpt_path"] = str(Path(tested).resolve()) if tested else None
    metrics["resumed_from"] = str(Path(resume_from).resolve()) if resume_from else None
    if trainer.global_rank == 0:  # under DDP every process gets the same (synced) metrics
        write_json_atomic(output_dir / "metrics.json", metrics)
        print(format_metrics(metrics))
    return metrics


def checkpoint_to_resume(cfg: DictConfig) -> str | None:
    """The checkpoint fit continues from: resume=RUN_DIR's last.ckpt, or ckpt_path=FILE.

    Checked before anything runs: the file must be a readable sae checkpoint of the same
    architecture as the config, or the run stops with one line saying which key differs.
    """
    if cfg.get("resume") and cfg.get("ckpt_path"):
        raise ConfigError(f"resume={cfg.resume} and ckpt_path={cfg.ckpt_path}: pass one of them")
    if cfg.get("resume"):
        path = Path(cfg.resume) / "checkpoints" / "last.ckpt"
        if not path.is_file():
            raise CheckpointError(f"resume={cfg.resume}: no {path} (pass the folder of a train.py run)")
    elif cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
    else:
        return None
    saved = read_checkpoint(path)["hyper_parameters"]
    wanted = OmegaConf.to_container(cfg.model, resolve=True)
    for key in ARCHITECTURE:
        if key in saved and saved[key] != wanted[key]:
            raise CheckpointError(
                f"{path} holds a model with {key}={saved[key]}, the config asks for {key}={wanted[key]}; "
                f"pass the same model settings to continue it"
            )
    return str(path)


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except SIGTERMException:  # SaveOnInterrupt has written last.ckpt and said how to resume
        sys.exit(128 + signal.SIGTERM)
    except (ConfigError, InstantiationException, DataError, CheckpointError, TrainingDiverged) as err:
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # Hydra records the job as failed and the sweep goes on with the others
        kind = "config error" if isinstance(err, ConfigError | InstantiationException) else "error"
        sys.exit(f"{kind}: {one_line(err, limit=400)}")  # one line, no traceback: it says what to fix
    return metrics.get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
