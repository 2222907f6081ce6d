"""Checkpoints: how they are written, read, rebuilt into a model, and checked before a resume.

Every checkpoint this project reads goes through `read_checkpoint`, which loads it with
`weights_only=True`: a checkpoint holds tensors and plain values only (the module saves its
hyperparameters as such), so a crafted pickle cannot run code.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.plugins import TorchCheckpointIO
from omegaconf import DictConfig

from sae.config import (
    DATA_RULES,
    RENAMED,
    ConfigError,
    check_checkpoint_file,
    check_model_settings,
    check_settings,
    is_number,
    model_settings,
)
from sae.core.settings import SETTINGS
from sae.errors import CheckpointError, one_line
from sae.run.atomic import write_atomic
from sae.training.module import SparseAutoencoderModule, module_defaults

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
# ... and of the method's settings: the method, TopK's k, and AuxK (its dead-latent counter is
# part of the module's state).
ARCHITECTURE_SPARSITY = ("method", "k", "auxk")


def architecture(model: Mapping[str, Any]) -> dict[str, Any]:
    """The module arguments a checkpoint's weights and state depend on, by name (`sparsity.k`)."""
    sparsity = model.get("sparsity") or {}
    shape = {key: model.get(key) for key in ARCHITECTURE}
    return shape | {f"sparsity.{key}": sparsity.get(key) for key in ARCHITECTURE_SPARSITY}


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
        ckpt = read_checkpoint(path, map_location=map_location or "cpu")
        # Its settings and weights checked as evaluate.py checks them, before Lightning reads any.
        check_weights(path, ckpt, SparseAutoencoderModule(**saved_settings(path, ckpt).model))
        return ckpt


def refuse_restore(path: str, err: BaseException) -> CheckpointError:
    """What a checkpoint Lightning cannot restore is reported as (lightning_internals' guard)."""
    return CheckpointError(
        f"{path}: Lightning cannot restore its training state ({type(err).__name__}: {one_line(err)}); "
        "refused (not a checkpoint this project wrote, or altered)"
    )


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
            trainer.save_checkpoint(self.last_model_path, weights_only=False)  # names itself, as Lightning

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
    path = check_checkpoint_file(path)
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
# Data settings that older checkpoints carry under a name since changed (sae.config.RENAMED).
RETIRED_DATA_HPARAMS = tuple(old.split(".", 1)[1] for old in RENAMED if old.startswith("data."))


@dataclass(frozen=True)
class SavedSettings:
    """What a checkpoint says it was trained with, each value checked by the rule of the setting
    it fills (sae.config, as on the command line): plain values only, never handed to Hydra."""

    model: dict[str, Any]  # SparseAutoencoderModule's arguments
    data: dict[str, Any]  # MNISTDataModule's arguments, as saved (older checkpoints: fewer)
    epochs: int | None  # the epochs the run was set to train (None: not recorded)


def saved_settings(path: str | Path, ckpt: dict) -> SavedSettings:
    """The checkpoint's settings, checked; a value of the wrong type or range, or a key this version
    does not know, is a one-line CheckpointError naming the file and the key."""
    model = _mapping(path, ckpt, "hyper_parameters")
    data = _mapping(path, ckpt, "datamodule_hyper_parameters")
    model = _method_settings_as_one({k: v for k, v in model.items() if k not in RETIRED_HPARAMS})
    data = {k: v for k, v in data.items() if k not in RETIRED_DATA_HPARAMS}
    epochs = ckpt.get("epochs")
    try:
        check_model_settings(model, lambda key: f"hyper_parameters.{key}", module_defaults())
        check_settings(data, DATA_RULES, lambda key: f"datamodule_hyper_parameters.{key}", "the data")
        check_settings({"epochs": epochs}, {"epochs": _EPOCHS}, str, "a checkpoint")
    except ConfigError as err:
        raise CheckpointError(
            f"{path}: {err}; refused (not a checkpoint this project wrote, or altered)"
        ) from err
    return SavedSettings(model, data, epochs)


# Before a method owned its settings, the module took every method's knobs as arguments of its own.
FLAT_METHOD_KNOBS = ("k", "auxk", "auxk_alpha", "auxk_k", "auxk_dead_after", "rho", "beta")


def _method_settings_as_one(model: dict[str, Any]) -> dict[str, Any]:
    """An older checkpoint's hyperparameters (`sparsity` a method's name, its knobs beside it, those
    of every other method too) as this version's: `sparsity` the method and its own settings."""
    if not isinstance(model.get("sparsity"), str) or model["sparsity"] not in SETTINGS:
        return model  # this version's, or not a checkpoint of ours: the checks say which
    method = model["sparsity"]
    fields = [f.name for f in dataclasses.fields(SETTINGS[method])]
    settings = {"method": method} | {k: model[k] for k in fields if k in model}
    return {k: v for k, v in model.items() if k not in FLAT_METHOD_KNOBS} | {"sparsity": settings}


_EPOCHS = (
    lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
    "an integer >= 1",
)


def _mapping(path: str | Path, ckpt: dict, key: str) -> dict[str, Any]:
    value = ckpt.get(key)
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
        raise CheckpointError(
            f"{path}: {key} is a {type(value).__name__}, not a mapping of settings; refused (not a "
            "checkpoint this project wrote, or altered)"
        )
    return dict(value)


def load_checkpoint(
    path: str | Path, map_location: str | torch.device = "cpu"
) -> tuple[SparseAutoencoderModule, dict]:
    """Rebuild the module from a checkpoint's own (checked) hyperparameters and weights.

    Returns the SparseAutoencoderModule and the data settings it was trained with (the data
    module's saved hyperparameters, checked; empty if there were none).
    """
    return module_from_checkpoint(path, read_checkpoint(path, map_location))


def module_from_checkpoint(path: str | Path, ckpt: dict) -> tuple[SparseAutoencoderModule, dict]:
    """load_checkpoint for a checkpoint already read (read_checkpoint); `path` names it in errors."""
    settings = saved_settings(path, ckpt)
    module = SparseAutoencoderModule(**settings.model)
    check_weights(path, ckpt, module)
    module.load_state_dict(ckpt["state_dict"])
    return module, settings.data


def check_weights(path: str | Path, ckpt: dict, module: torch.nn.Module) -> None:
    """The checkpoint's state_dict holds a tensor of the right shape for each of the module's
    weights and buffers, and nothing else; else a one-line CheckpointError."""
    state = ckpt.get("state_dict")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: state_dict is a {type(state).__name__}, not the model's weights")
    expected = module.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        said = "; ".join(
            f"{what} {', '.join(map(str, keys[:3]))}{' ...' if len(keys) > 3 else ''}"
            for what, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        )
        raise CheckpointError(
            f"{path}: its weights do not fit the model its hyper_parameters describe ({said})"
        )
    for key, tensor in expected.items():
        held = state[key]
        if not isinstance(held, torch.Tensor) or held.shape != tensor.shape or not held.is_floating_point():
            shape = tuple(held.shape) if isinstance(held, torch.Tensor) else type(held).__name__
            raise CheckpointError(
                f"{path}: state_dict.{key} is {shape}, the model its hyper_parameters describe needs a "
                f"float tensor of shape {tuple(tensor.shape)}"
            )


def check_training_state(path: str | Path, ckpt: dict, module: SparseAutoencoderModule) -> None:
    """What Lightning restores to continue training is there and fits the module: the weights, the
    optimizer state (one Adam over the module's parameters) and the loops' progress. A checkpoint
    without them would silently train again from epoch 0, or fail inside Lightning."""
    check_weights(path, ckpt, module)
    loops = ckpt.get("loops")
    fit_loop = loops.get("fit_loop") if isinstance(loops, dict) else None
    missing = ["loops.fit_loop"] if not isinstance(fit_loop, dict) else []
    missing += [
        f"loops.fit_loop.{k}" for k in FIT_PROGRESS if not missing and not isinstance(fit_loop.get(k), dict)
    ]
    if missing:  # Lightning would start counting again from epoch 0, silently
        raise CheckpointError(
            f"{path} holds no training progress ({missing[0]} is missing): training cannot continue "
            "from it; test it with evaluate.py, or start a new run"
        )
    for key in ("epoch", "global_step"):
        _count(path, key, ckpt.get(key))
    _check_progress(path, "loops", loops)
    callbacks = ckpt.get("callbacks")
    if not isinstance(callbacks, dict):
        raise CheckpointError(f"{path}: callbacks is a {type(callbacks).__name__}, not the callbacks' state")
    elapsed = (callbacks.get("Timer") or {}).get("time_elapsed", {})
    # Numbers, not always >= 0: Lightning's Timer records a negative validation time for a run
    # stopped during validation (seen on a SLURM requeue).
    if not isinstance(elapsed, dict) or not all(is_number(v) for v in elapsed.values()):
        raise CheckpointError(f"{path}: callbacks.Timer.time_elapsed={elapsed!r} must map stages to seconds")
    states = ckpt.get("optimizer_states")
    params = list(module.parameters())
    try:
        if not isinstance(states, list) or len(states) != 1:
            raise ValueError(f"{len(states) if isinstance(states, list) else 'no'} optimizer states, not one")
        state = states[0]
        torch.optim.Adam(params).load_state_dict(copy.deepcopy(state))  # groups and parameter counts
        for index, moments in state["state"].items():
            for name, value in moments.items():
                if name != "step" and tuple(value.shape) != tuple(params[index].shape):
                    raise ValueError(f"{name} of parameter {index} is {tuple(value.shape)}")
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as err:
        raise CheckpointError(
            f"{path}: its optimizer state does not fit the model ({one_line(err)}); refused"
        ) from err


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


def _count(path: str | Path, key: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise CheckpointError(f"{path}: {key}={value!r} must be an integer >= 0")


# The parts of Lightning's fit loop state that say where training stopped: the epoch, the batch in
# it, and the optimizer steps (global_step). Lightning skips a part that is missing.
FIT_PROGRESS = (
    "epoch_progress",
    "epoch_loop.batch_progress",
    "epoch_loop.manual_optimization.optim_step_progress",
)
# Progress counters in Lightning's loops state: how many batches, epochs, steps were ready, started...
PROGRESS_COUNTERS = {"ready", "started", "processed", "completed"}


def _check_progress(path: str | Path, where: str, node: Any) -> None:
    """Lightning's loops state: nested mappings whose progress counters are integers >= 0 and whose
    flags are bools (Lightning loads them as given, and fails later, mid-run, on anything else)."""
    if isinstance(node, dict):
        if node and set(node) <= PROGRESS_COUNTERS:
            for key, value in node.items():
                _count(path, f"{where}.{key}", value)
            return
        for key, value in node.items():
            if key == "is_last_batch" and not isinstance(value, bool):
                raise CheckpointError(f"{path}: {where}.{key}={value!r} must be true or false")
            if key == "_batches_that_stepped":
                _count(path, f"{where}.{key}", value)
            _check_progress(path, f"{where}.{key}", value)


def checkpoint_to_resume(cfg: DictConfig) -> str | None:
    """The checkpoint fit continues from: resume=RUN_DIR's last.ckpt, or ckpt_path=FILE.

    Checked before anything runs: the file must be a readable checkpoint of this project whose
    settings pass the config's rules, of the same architecture as the config, with a training
    state (weights, optimizer, loops) that fits it; else the run stops with one line.
    """
    if cfg.get("resume") and cfg.get("ckpt_path"):
        raise ConfigError(f"resume={cfg.resume} and ckpt_path={cfg.ckpt_path}: pass one of them")
    if cfg.get("resume"):
        path = last_checkpoint(cfg.resume)
    elif cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path)
    else:
        return None
    ckpt = read_checkpoint(path)
    saved = saved_settings(path, ckpt).model
    held = architecture(module_defaults() | saved)  # a key newer than the checkpoint: its default
    wanted = architecture(model_settings(cfg))
    for key, value in held.items():
        if value != wanted[key]:
            raise CheckpointError(
                f"{path} holds a model with {key}={value}, the config asks for {key}={wanted[key]}; "
                f"pass the same model settings to continue it"
            )
    check_training_state(path, ckpt, SparseAutoencoderModule(**saved))
    return str(path)
