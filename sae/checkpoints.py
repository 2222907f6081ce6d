"""Checkpoints: how they are written, read, rebuilt into a model, and checked before a resume.

Every checkpoint this project reads goes through `read_checkpoint`, which loads it with
`weights_only=True`: a checkpoint holds tensors and plain values only (the module saves its
hyperparameters as such), so a crafted pickle cannot run code.
"""

from __future__ import annotations

import inspect
import pickle
import re
import zipfile
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from omegaconf import DictConfig, ListConfig, OmegaConf

from sae.atomic import write_atomic
from sae.config import MIRRORS, ConfigError
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
    "k",
    "auxk",  # its dead-latent counter is part of the module's state
)


class CheckpointError(UserError, RuntimeError):
    """A checkpoint path that is missing, unreadable, or not one of this project's checkpoints."""


class SafeCheckpointIO(TorchCheckpointIO):
    """Every checkpoint Lightning writes or reads for this project (fit, resume, test).

    Written beside the target and renamed over it, so a crash mid-save never leaves half a
    last.ckpt (Lightning's own save stages in the temp folder and copies across file systems).
    Read through `read_checkpoint`, weights-only even when TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD is set
    (torch honours it only where the caller did not ask for weights_only): Lightning's default
    loading would unpickle whatever a path points at.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path, storage_options: Any | None = None) -> None:
        write_atomic(path, lambda f: torch.save(checkpoint, f))

    def load_checkpoint(self, path, map_location: Any = None, weights_only: bool | None = None) -> dict:
        return read_checkpoint(path, map_location=map_location or "cpu")


class RunFolderCheckpoint(ModelCheckpoint):
    """ModelCheckpoint whose saved paths (best, last, top k) mean files of this run's checkpoint
    folder, wherever that folder is now.

    Lightning stores absolute paths in last.ckpt and, when the folder has moved or been copied,
    keeps only the best path, pointing at the old place: a resumed copy would test the original's
    checkpoint, a moved run would fail after training, and the best score would be lost. Here each
    saved path is taken by its file name inside this folder; a path that was not in the run's
    checkpoint folder, or whose file is not here, is dropped, so nothing outside the run folder is
    ever tested or loaded.

    `save_last=True` writes last.ckpt at the end of every epoch (after its validation). Lightning's
    own `save_last=True` writes it only when a best checkpoint is saved at the same step: after an
    epoch that did not improve val/loss, last.ckpt would still hold an earlier epoch, and a resumed
    or extended run would train again from there.
    """

    def __init__(self, *args: Any, save_last: bool | None = None, **kwargs: Any) -> None:
        super().__init__(*args, save_last=False, **kwargs)
        self.last_every_epoch = bool(save_last)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        super().on_train_epoch_end(trainer, pl_module)  # after the epoch's validation and best save
        if self.last_every_epoch and self.dirpath and not trainer.fast_dev_run:
            self.last_model_path = str(
                Path(self.dirpath) / f"{self.CHECKPOINT_NAME_LAST}{self.FILE_EXTENSION}"
            )
            trainer.save_checkpoint(self.last_model_path)  # the state saved names it, as Lightning's does

    @property
    def state_key(self) -> str:
        # Lightning keys a callback's saved state by its class name: keep ModelCheckpoint's, so
        # checkpoints written with the plain ModelCheckpoint resume with their best score.
        return "ModelCheckpoint" + super().state_key.removeprefix(type(self).__qualname__)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved_dir = Path(str(state_dict.get("dirpath") or self.dirpath))

        def here(path: str | None) -> str:
            if not path or Path(path).parent != saved_dir or self.dirpath is None:
                return ""
            candidate = Path(self.dirpath) / Path(path).name
            return str(candidate) if candidate.is_file() else ""

        state = dict(state_dict, dirpath=self.dirpath)
        for key in ("best_model_path", "kth_best_model_path", "last_model_path"):
            state[key] = here(state_dict.get(key))
        state["best_k_models"] = {
            here(k): v for k, v in (state_dict.get("best_k_models") or {}).items() if here(k)
        }
        if not state["best_model_path"]:
            state["best_model_score"] = None
        super().load_state_dict(state)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """A training checkpoint as a dict, loaded weights-only; a missing, unreadable or foreign file
    is a one-line CheckpointError."""
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("**/*.ckpt"))[:3]
        hint = f" (it holds {', '.join(found)})" if found else ""
        raise CheckpointError(f"{path} is a folder, not a checkpoint file: pass one of its .ckpt files{hint}")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path} (pass ckpt_path=<run>/checkpoints/*.ckpt)")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"cannot load {path} as a PyTorch checkpoint: it is not a file torch.save writes"
        )
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        what = f" ({found.group(1)})" if found else ""
        raise CheckpointError(
            f"cannot load {path} as a PyTorch checkpoint: it holds Python objects{what} that loading "
            "would run as code; this project's checkpoints hold tensors and plain values only, so refused"
        ) from err
    except Exception as err:
        raise CheckpointError(f"cannot load {path} as a PyTorch checkpoint: {one_line(err)}") from err
    if not isinstance(ckpt, dict) or not {"hyper_parameters", "state_dict"} <= ckpt.keys():
        raise CheckpointError(f"{path} is not a sae training checkpoint (no hyper_parameters/state_dict)")
    return ckpt


# Module settings that older checkpoints carry and the module no longer takes: metric definitions
# since replaced (dead = never active, by firing frequency), not part of the trained model.
RETIRED_HPARAMS = ("dead_threshold", "saturation_level")


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[SparseAutoencoderModule, dict]:
    """Rebuild the module from a checkpoint's own hyperparameters and weights.

    Returns the SparseAutoencoderModule and the data settings it was trained with (the data
    module's saved hyperparameters, empty if there were none).
    """
    ckpt = read_checkpoint(path, map_location)
    hparams = {k: v for k, v in ckpt["hyper_parameters"].items() if k not in RETIRED_HPARAMS}
    try:
        module = SparseAutoencoderModule(**hparams)
        module.load_state_dict(ckpt["state_dict"])
    except (TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"{path} does not fit SparseAutoencoderModule: {one_line(err)}") from err
    return module, dict(ckpt.get("datamodule_hyper_parameters") or {})


def last_checkpoint_path(run: str | Path) -> Path:
    """Where a run folder keeps the checkpoint that resume= continues from (it may not exist)."""
    return Path(run) / "checkpoints" / "last.ckpt"


def last_checkpoint(run: str | Path) -> Path:
    """A run folder's checkpoints/last.ckpt, or a one-line CheckpointError saying what to do."""
    path = last_checkpoint_path(run)
    others = sorted(path.parent.glob("*.ckpt"), key=lambda p: p.stat().st_mtime)  # newest last
    if not path.is_file() and others:  # e.g. killed while writing its first last.ckpt
        raise CheckpointError(
            f"resume={run}: no {path}, but {others[-1].name} is there (the run stopped before writing "
            f"last.ckpt); to continue from it: cp {others[-1]} {path} && python train.py resume={run}"
        )
    if not path.is_file():
        raise CheckpointError(f"resume={run}: no {path} (pass the folder of a train.py run)")
    return path


def checkpoint_to_resume(cfg: DictConfig) -> str | None:
    """The checkpoint fit continues from: resume=RUN_DIR's last.ckpt, or ckpt_path=FILE.

    Checked before anything runs: the file must be a readable checkpoint of the same architecture
    as the config, or the run stops with one line saying which key differs.
    """
    if cfg.get("resume") and cfg.get("ckpt_path"):
        raise ConfigError(f"resume={cfg.resume} and ckpt_path={cfg.ckpt_path}: pass one of them")
    if cfg.get("resume"):
        path = last_checkpoint(cfg.resume)
    elif cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
    else:
        return None
    saved = read_checkpoint(path)["hyper_parameters"]
    wanted = OmegaConf.to_container(cfg.model, resolve=True)
    defaults = inspect.signature(SparseAutoencoderModule).parameters
    for key in ARCHITECTURE:
        held = saved.get(key, defaults[key].default)  # a key newer than the checkpoint: its default
        if held != wanted[key]:
            raise CheckpointError(
                f"{path} holds a model with {key}={held}, the config asks for {key}={wanted[key]}; "
                f"pass the same model settings to continue it"
            )
    return str(path)


# Data settings a resumed run keeps (what its checkpoint's weights were trained on); the rest of
# the data group (where the files are, evaluation batches, workers) may change on resume.
KEPT_DATA_SETTINGS = ("seed", "batch_size", "val_size", "split_seed")
CHANGEABLE_ON_RESUME = ("epochs",)  # applied for real and recorded in metrics.json


def resume_with_run_settings(cfg: DictConfig, explicit: list[str] | None) -> dict[str, Any]:
    """Make cfg train what the resumed run (cfg.resume) trained: its own settings, from its last.ckpt.

    `explicit` are the override keys the resume command set (None: take cfg literally, as an
    in-process caller means every value). A training setting the command sets to another value
    than the run's is refused in one line; one it does not set is taken from the run; `epochs`
    may change (more training), and then it is returned, to be recorded.
    """
    run = Path(cfg.resume)
    ckpt = read_checkpoint(last_checkpoint(run))
    settings = {_config_key("model", k): v for k, v in ckpt["hyper_parameters"].items()}
    data = ckpt.get("datamodule_hyper_parameters") or {}
    settings |= {_config_key("data", k): data[k] for k in KEPT_DATA_SETTINGS if k in data}
    settings["epochs"] = ckpt.get("epochs")  # the epochs the run was set to train (module hook)

    def set_by_command(key: str) -> bool:
        return explicit is None or any(key == e or key.startswith(e + ".") for e in explicit)

    changed = {}
    for key, saved in settings.items():
        if saved is None or OmegaConf.select(cfg, key, default=_ABSENT) is _ABSENT:
            continue
        current = OmegaConf.select(cfg, key)
        if isinstance(current, DictConfig | ListConfig):
            current = OmegaConf.to_container(current)
        if current == saved:
            continue
        if not set_by_command(key):
            OmegaConf.update(cfg, key, saved, merge=False)
        elif key in CHANGEABLE_ON_RESUME:
            changed[key] = current
        else:
            raise ConfigError(
                f"resume={cfg.resume}: {key}={current} differs from the run's {key}={saved}; a resumed run "
                "keeps the settings it was trained with: drop the override, or start a new run"
            )
    return changed


_ABSENT = object()


def _config_key(group: str, name: str) -> str:
    """Where a saved hyperparameter lives in the training config: its top-level knob if it has one."""
    key = f"{group}.{name}"
    return MIRRORS.get(key, key)
