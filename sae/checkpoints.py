"""Checkpoints: how they are written, read, rebuilt into a model, and checked before a resume.

Every checkpoint this project reads goes through `read_checkpoint`, which loads it with
`weights_only=True`: a checkpoint holds tensors and plain values only (the module saves its
hyperparameters as such), so a crafted pickle cannot run code.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.plugins import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from sae.atomic import write_atomic
from sae.config import ConfigError
from sae.console import UserError, one_line
from sae.module import SparseAutoencoderModule

# The hyperparameters that shape the network: a checkpoint's weights fit only the same values
# (resuming with others is refused), and only runs that share them can be stacked.
ARCHITECTURE = (
    "input_dim",
    "hidden_dims",
    "latent_dim",
    "activation",
    "latent_activation",
    "output_activation",
    "sparsity_layers",
)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint path that is missing, unreadable, or not one of this project's checkpoints."""


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoints written beside their target and renamed over it, so a crash mid-save never
    leaves half a last.ckpt (Lightning's own save stages in the temp folder and copies across
    file systems when that is another one)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        write_atomic(path, lambda f: torch.save(checkpoint, f))


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A training checkpoint as a dict, loaded weights-only; a missing, unreadable or foreign file
    is a one-line CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (pass ckpt_path=<run>/checkpoints/*.ckpt)")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"cannot load {path} as a PyTorch checkpoint: {one_line(err)}") from err
    if not isinstance(ckpt, dict) or not {"hyper_parameters", "state_dict"} <= ckpt.keys():
        raise CheckpointError(f"{path} is not a sae training checkpoint (no hyper_parameters/state_dict)")
    return ckpt


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[SparseAutoencoderModule, dict]:
    """Rebuild the module from a checkpoint's own hyperparameters and weights.

    Returns the SparseAutoencoderModule and the data settings it was trained with (the data
    module's saved hyperparameters, empty if there were none).
    """
    ckpt = read_checkpoint(path, map_location)
    try:
        module = SparseAutoencoderModule(**ckpt["hyper_parameters"])
        module.load_state_dict(ckpt["state_dict"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} does not fit SparseAutoencoderModule: {one_line(err)}") from err
    return module, dict(ckpt.get("datamodule_hyper_parameters") or {})


def checkpoint_to_resume(cfg: DictConfig) -> str | None:
    """The checkpoint fit continues from: resume=RUN_DIR's last.ckpt, or ckpt_path=FILE.

    Checked before anything runs: the file must be a readable checkpoint of the same architecture
    as the config, or the run stops with one line saying which key differs.
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
