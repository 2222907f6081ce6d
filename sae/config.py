"""Checks on a composed training config, run before any data is read or a model is built.

A mistyped override (rho=1.5, lr=0, model.recon_loss=mae) should cost the researcher one line
naming the key, the value and what is allowed, not a traceback from deep inside torch, and not a
run that trains on a meaningless objective.
"""

from __future__ import annotations

import math
import zipfile
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from sae.core.settings import (
    ACTIVATION_NAMES,
    FLOAT32_MAX,
    LATENT_ONLY_ACTIVATIONS,
    RECONSTRUCTION_LOSSES,
    SETTINGS,
    InvalidSetting,
    MethodSettings,
    layer_names,
    method_settings,
)
from sae.errors import CheckpointError, UserError, did_you_mean, one_line
from sae.names import selectable

HIDDEN_ACTIVATIONS = [a for a in ACTIVATION_NAMES if a not in LATENT_ONLY_ACTIVATIONS]

MNIST_TRAIN_IMAGES = 60000
MNIST_PIXELS = 28 * 28
MAX_LR = FLOAT32_MAX * 0.1
MAX_SEED = 2**32 - 1  # numpy's seed range, which Lightning's seed_everything uses

# Group settings that follow a top-level knob. The YAML sets each to `${knob}`: the knob is the one
# spelling a researcher uses, and what sweeps, the HParams entry, metrics, the sweep summary and the
# vectorized launcher's grouping read. A copy set on its own is refused, naming the knob.
MIRRORS = {
    "model.latent_dim": "latent_dim",
    "model.sparsity.k": "k",
    "model.sparsity.rho": "rho",
    "model.sparsity.beta": "beta",
    "model.sparsity.target_l0": "target_l0",
    "model.lr": "lr",
    "data.seed": "seed",
    "data.batch_size": "batch_size",
    "trainer.max_epochs": "epochs",
    "trainer.default_root_dir": "output_dir",
}
# Data settings that say where and how a run reads its data, not what it trains on (the rest, the
# split and the batches, do): they may differ between runs that are the same run.
DATA_EXECUTION_SETTINGS = (
    "data.root",
    "data.download",
    "data.eval_batch_size",
    "data.num_workers",
    "data.on_device",
    "data.batches_per_call",
)
# Renamed settings: the old key stays in the YAML as null, so that setting it (on the command line
# or in a preset) is a one-line error naming the new key; group_settings drops it.
RENAMED = {"data.batches_per_step": "data.batches_per_call"}


class ConfigError(UserError, ValueError):
    """An invalid config value; the message names the key, the value and what is allowed."""

    kind = "config error"


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} must be {allowed}")


_ABSENT = object()


def _raw(cfg: DictConfig, key: str, absent: Any = None):
    """The value at a dotted key as written (an interpolation stays `${...}`); `absent` if none."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent)
    if not isinstance(node, DictConfig) or leaf not in node:
        return absent
    return OmegaConf.to_container(node, resolve=False)[leaf]


def check_one_spelling(cfg: DictConfig) -> None:
    """Refuse a group copy of a top-level knob set on its own (null included), and a renamed key
    that is set."""
    for key, knob in MIRRORS.items():
        raw = _raw(cfg, key, _ABSENT)
        if raw is not _ABSENT and raw != f"${{{knob}}}":
            raise ConfigError(
                f"{key}={raw!r}: {key} follows the top-level knob {knob}, so set {knob}={raw} instead"
            )
    for old, new in RENAMED.items():
        raw = _raw(cfg, old)
        if raw is not None:
            raise ConfigError(f"{old} was renamed {new}: set {new}={raw} instead")


# What each setting may be: a test of the (resolved, plain) value and the words that say it (or a
# function that gives them).
Rule = tuple[Callable[[Any], bool], str | Callable[[], str]]


def _number_in(low: float, high: float, closed: str = "()") -> Rule:
    def ok(v: Any) -> bool:
        if not is_number(v):
            return False
        above = v >= low if closed[0] == "[" else v > low
        below = v <= high if closed[1] == "]" else v < high
        return above and below

    shown = [f"{b:.3g}" if abs(b) > 1e6 else f"{b:g}" for b in (low, high)]
    return ok, f"a number in {closed[0]}{shown[0]}, {shown[1]}{closed[1]}"


def _int_at_least(low: int, nullable: bool = False) -> Rule:
    return (
        lambda v: (nullable and v is None) or (_is_int(v) and v >= low),
        f"an integer >= {low}" + (" (or null)" if nullable else ""),
    )


def _one_of(choices: Iterable[str]) -> Rule:
    """One of `choices`, read when checked: a registry (SETTINGS) may grow after import."""
    return (
        lambda v: isinstance(v, str) and v in choices,
        lambda: f"one of {', '.join(choices)}",
    )


def _list_of(item: Callable[[Any], bool], allowed: str, non_empty: bool = False) -> Rule:
    return (
        lambda v: isinstance(v, list | tuple) and (len(v) > 0 or not non_empty) and all(map(item, v)),
        allowed,
    )


_BOOL: Rule = (lambda v: isinstance(v, bool), "true or false")
_SEED: Rule = (lambda v: _is_int(v) and 0 <= v <= MAX_SEED, f"an integer in [0, {MAX_SEED}]")
_UNIT: Rule = _number_in(0, 1, "[]")

# SparseAutoencoderModule's arguments (what a checkpoint's hyper_parameters hold).
MODEL_RULES: dict[str, Rule] = {
    "input_dim": (
        lambda v: v == MNIST_PIXELS and _is_int(v),
        f"{MNIST_PIXELS}: MNIST images have 28x28 pixels",
    ),
    "hidden_dims": (
        lambda v: isinstance(v, list | tuple) and all(_is_int(h) and h >= 1 for h in v),
        "a list of integers >= 1, e.g. [128]",
    ),
    "latent_dim": _int_at_least(1),
    "activation": _one_of(HIDDEN_ACTIVATIONS),
    "latent_activation": _one_of(ACTIVATION_NAMES),
    "output_activation": _one_of(HIDDEN_ACTIVATIONS),
    "recon_loss": _one_of(RECONSTRUCTION_LOSSES),
    "sparsity_layers": _list_of(lambda v: isinstance(v, str), "a list of layer names, e.g. [latent]", True),
    # Adam divides lr by 1 - beta1 = 0.1 at the first step, in float32.
    "lr": _number_in(0, MAX_LR, "(]"),
    "l0_threshold": _UNIT,
    "rare_density": _UNIT,
    "dense_density": _UNIT,
    "l0_also_at": _list_of(lambda v: _UNIT[0](v), "a list of numbers in [0, 1], e.g. [0.05, 0.5]"),
}
# MNISTDataModule's arguments (what a checkpoint's datamodule_hyper_parameters hold).
DATA_RULES: dict[str, Rule] = {
    "root": (
        lambda v: isinstance(v, str) and v != "",
        "a folder path (quote one that reads as a number or a bool: data.root='123')",
    ),
    "download": _BOOL,
    "val_size": (
        lambda v: _is_int(v) and 0 <= v < MNIST_TRAIN_IMAGES,
        f"an integer in [0, {MNIST_TRAIN_IMAGES}): images held out of the training set",
    ),
    "batch_size": _int_at_least(1),
    "eval_batch_size": _int_at_least(1),
    "num_workers": _int_at_least(0),
    "seed": _SEED,
    "split_seed": (_is_int, "an integer"),
    "on_device": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
    "batches_per_call": _int_at_least(1),
}
# The top-level settings of a training config that are not copied into a group.
TOP_LEVEL_RULES: dict[str, Rule] = {
    "epochs": _int_at_least(1),
    "threads": _int_at_least(1, nullable=True),
    "cuda_graph": _BOOL,
    "seed": _SEED,
    "optimized_metric": (
        selectable,
        "a validation metric (val/loss, val/mse, ...) or null: a sweeper selects on the validation split, "
        "never on the test split it reports",
    ),
    "resume": (lambda v: v is None or (isinstance(v, str) and v != ""), "a run folder (or null)"),
    "ckpt_path": (lambda v: v is None or (isinstance(v, str) and v != ""), "a checkpoint file (or null)"),
}


def check_settings(
    values: Mapping[str, Any], rules: Mapping[str, Rule], name: Callable[[str], str], what: str
) -> None:
    """Raise ConfigError on the first value that breaks its rule, or a key no rule knows (with the
    nearest known key). `name(key)` is how the message spells the key (`rho`, `model.activation`,
    `hyper_parameters.rho`); `what` names the settings, for an unknown key."""
    for key, value in values.items():
        if key not in rules:
            raise ConfigError(f"{name(key)} is not a setting of {what}{did_you_mean(key, rules)}")
        ok, allowed = rules[key]
        if not plain_value(value) or not ok(value):
            said = allowed() if callable(allowed) else allowed
            raise ConfigError(f"{name(key)}={_shown(value)} must be {said}")


def check_model_settings(
    model: Mapping[str, Any], name: Callable[[str], str], defaults: Mapping[str, Any] | None = None
) -> None:
    """The module's arguments, one by one (MODEL_RULES; the method's settings by the method
    itself), then how they go together; `defaults` fill the arguments a mapping leaves out (a
    checkpoint of an older version: the module's own defaults, handed in from sae.training)."""
    check_settings({k: v for k, v in model.items() if k != "sparsity"}, MODEL_RULES, name, "the model")
    settings = dict(defaults or {}) | dict(model)
    missing = [key for key in (*MODEL_RULES, "sparsity") if key not in settings]
    if missing:
        raise ConfigError(f"{name(missing[0])} is missing: the model needs a value for it")
    method = check_method_settings(settings["sparsity"], settings["latent_dim"], name)
    latent = settings["latent_activation"]
    _check(
        latent in method.latent_activations,
        name("latent_activation"),
        latent,
        f"one of {', '.join(method.latent_activations)} with sparsity={method.method}",
    )
    layers = list(settings["sparsity_layers"])
    if method.only_latent:
        _check(
            layers == ["latent"], name("sparsity_layers"), layers, f"[latent] with sparsity={method.method}"
        )
    names = layer_names(len(settings["hidden_dims"]))
    unknown = [layer for layer in layers if layer not in names]
    if unknown:
        raise ConfigError(
            f"{name('sparsity_layers')}={layers}: {', '.join(unknown)} not in this model's layers "
            f"{', '.join(names)}"
        )


def check_method_settings(sparsity: Any, latent_dim: int, name: Callable[[str], str]) -> MethodSettings:
    """`model.sparsity`: a mapping of plain values naming a method and its settings, which the
    settings check themselves (sae.core.settings); the settings."""
    if not isinstance(sparsity, Mapping) or not all(
        isinstance(k, str) and not k.startswith("_") for k in sparsity
    ):
        choose = f"{{method: {'|'.join(SETTINGS)}, <its settings>}} (choose it with sparsity=<name>)"
        raise ConfigError(f"{name('sparsity')}={_shown(sparsity)} must be a method's settings, {choose}")
    for key, value in sparsity.items():
        if not plain_value(value):
            said = "a plain value (a number, true or false, null, or a name)"
            raise ConfigError(f"{name(f'sparsity.{key}')}={_shown(value)} must be {said}")
    try:
        settings = method_settings(sparsity)
        settings.check(latent_dim)
    except InvalidSetting as err:
        raise ConfigError(
            f"{name(f'sparsity.{err.key}')}={_shown(err.value)} must be {err.allowed}"
        ) from None
    return settings


def plain_value(value: Any) -> bool:
    """Whether value is what a setting may hold: null, a bool, a finite or infinite number, a
    string that is not an interpolation (`${...}` would be resolved: a path into other settings or
    a resolver's call), or a list of those. Never a mapping: a mapping with `_target_` is code
    to Hydra's instantiate."""
    if value is None or isinstance(value, bool | int | float):
        return True
    if isinstance(value, str):
        return "${" not in value
    if isinstance(value, list | tuple):
        return all(plain_value(v) for v in value)
    return False


def _shown(value: Any) -> str:
    """A value as an error message shows it: short, on one line."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def knob_name(group: str) -> Callable[[str], str]:
    """How a command-line message names a group's key: its top-level knob where it follows one."""
    return lambda key: MIRRORS.get(f"{group}.{key}", f"{group}.{key}")


def group_settings(cfg: DictConfig, group: str, target: str) -> dict[str, Any]:
    """A config group's settings (model or data) as plain values, resolved, without the keys that
    are not arguments (`_target_`, `_convert_`, retired names); ConfigError where one cannot be
    resolved, or where `_target_` names another class than `target`: the project builds its own
    model and data module from checked settings, never a class a config names."""
    node = cfg.get(group)
    if not isinstance(node, DictConfig):
        raise ConfigError(f"{group}={_shown(node)} must be the {group} settings (a config group)")
    try:
        values = OmegaConf.to_container(node, resolve=True)
    except OmegaConfBaseException as err:
        raise ConfigError(f"{group}: {one_line(err)}") from err
    named = values.pop("_target_", target)
    if named != target:
        raise ConfigError(f"{group}._target_={named!r}: the {group} is {target}; remove the override")
    values.pop("_convert_", None)
    for old in RENAMED:
        if old.startswith(f"{group}."):
            values.pop(old.split(".", 1)[1], None)
    return values


MODEL_TARGET = "sae.training.module.SparseAutoencoderModule"
DATA_TARGET = "sae.data.mnist.MNISTDataModule"


def model_settings(cfg: DictConfig) -> dict[str, Any]:
    """The model's arguments from a training config, checked (SparseAutoencoderModule(**them))."""
    model = group_settings(cfg, "model", MODEL_TARGET)
    check_model_settings(model, knob_name("model"))
    return model


def data_settings(cfg: DictConfig) -> dict[str, Any]:
    """The data module's arguments from a config, checked (MNISTDataModule(**them)); a null among
    them takes the data module's default (evaluate.py's training settings are the checkpoint's)."""
    data = group_settings(cfg, "data", DATA_TARGET)
    check_settings(data, DATA_RULES, knob_name("data"), "the data")
    return data


def validate_train_config(cfg: DictConfig) -> None:
    """Raise ConfigError on the first invalid value among the knobs a researcher sets."""
    check_one_spelling(cfg)
    check_top_level_keys(cfg)
    check_target_is_read(cfg)
    top = {k: cfg.get(k) for k in TOP_LEVEL_RULES if k in cfg}
    check_settings(top, TOP_LEVEL_RULES, str, "train.py")
    model_settings(cfg)
    data_settings(cfg)
    check_trainer(cfg)
    check_callbacks(cfg)
    check_memory(cfg)


# The top-level keys of a composed training config (tests/test_config.py checks every preset).
TRAIN_TOP_LEVEL = (
    *("rho", "beta", "latent_dim", "k", "target_l0", "lr", "epochs", "batch_size", "seed", "threads"),
    *("cuda_graph", "optimized_metric", "resume", "ckpt_path", "output_dir"),
    *("model", "data", "trainer", "logger", "callbacks", "hydra"),
)


def check_target_is_read(cfg: DictConfig) -> None:
    """A target_l0 the chosen method's YAML does not pass on (`target_l0: ${target_l0}`) is refused,
    not silently ignored."""
    sparsity = cfg.model.get("sparsity") if isinstance(cfg.get("model"), DictConfig) else None
    if cfg.get("target_l0") is not None and isinstance(sparsity, DictConfig) and "target_l0" not in sparsity:
        method = sparsity.get("method")
        raise ConfigError(
            f"target_l0={cfg.target_l0}: sparsity={method} does not read it (its conf/sparsity/{method}.yaml "
            "has no `target_l0: ${target_l0}` under model.sparsity)"
        )


def check_top_level_keys(cfg: DictConfig) -> None:
    """Refuse a top-level key no config of this project uses (`+bta=0.1`), naming the nearest."""
    known = TRAIN_TOP_LEVEL
    unknown = [k for k in cfg if k not in known]
    if unknown:
        key = unknown[0]
        raise ConfigError(f"{key} is not a setting of train.py{did_you_mean(key, sorted(known))}")


EVALUATE_TOP_LEVEL = (
    *("ckpt_path", "sweep_dir", "compare_runs", "threads", "output_dir"),
    *("data", "trainer", "logger", "callbacks", "hydra"),
)
EVALUATE_RULES: dict[str, Rule] = {
    "ckpt_path": (lambda v: v is None or (isinstance(v, str) and v != ""), "a checkpoint file (or null)"),
    "sweep_dir": (lambda v: v is None or (isinstance(v, str) and v != ""), "a sweep folder (or null)"),
    "compare_runs": (
        lambda v: (
            v is None or (isinstance(v, list) and len(v) >= 2 and all(isinstance(p, str) and p for p in v))
        ),
        "a list of two or more run folders, e.g. [outputs/a,outputs/b] (or null)",
    ),
    "threads": TOP_LEVEL_RULES["threads"],
    "output_dir": (lambda v: isinstance(v, str) and v != "", "a folder"),
}


def check_checkpoint_file(path: str | Path) -> Path:
    """The path of a checkpoint file, as far as it is checked without reading it (here, without
    torch: evaluate.py answers a mistyped ckpt_path at once); CheckpointError if it is a folder,
    missing, or not a file torch.save writes. sae.training.checkpoints reads it."""
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
    return path


def _plain(value: Any) -> Any:
    """A config value as plain Python (a ListConfig as a list, interpolations kept as text)."""
    return OmegaConf.to_container(value, resolve=False) if isinstance(value, ListConfig) else value


def validate_evaluate_config(cfg: DictConfig) -> None:
    """evaluate.py's checks: its own keys, the data settings it takes from the command line (the
    training ones, null here, come from the checkpoint and are checked there), the trainer."""
    unknown = [k for k in cfg if k not in EVALUATE_TOP_LEVEL]
    if unknown:
        raise ConfigError(
            f"{unknown[0]} is not a setting of evaluate.py{did_you_mean(unknown[0], EVALUATE_TOP_LEVEL)}"
        )
    values = {k: _plain(cfg.get(k)) for k in EVALUATE_RULES if k in cfg}
    check_settings(values, EVALUATE_RULES, str, "evaluate.py")
    data = {k: v for k, v in group_settings(cfg, "data", DATA_TARGET).items() if v is not None}
    check_settings(data, DATA_RULES, lambda key: f"data.{key}", "the data")
    check_trainer(cfg, training=False)
    check_callbacks(cfg)


# Lightning's names for the numeric precisions this model trains and tests in.
PRECISIONS = ("32-true", "32", "16-mixed", "bf16-mixed")


def _batch_limit(positive: bool) -> Rule:
    low = "1" if positive else "0"
    return (
        lambda v: (
            (_is_int(v) and v >= int(low))
            or (isinstance(v, float) and (0 < v if positive else 0 <= v) and v <= 1)
        ),
        f"an integer >= {low} (batches) or a fraction in {'(' if positive else '['}0, 1] of the split",
    )


TRAINER_RULES: dict[str, Rule] = {
    "log_every_n_steps": _int_at_least(0),
    "limit_train_batches": _batch_limit(positive=True),
    "limit_val_batches": _batch_limit(positive=False),
    "limit_test_batches": _batch_limit(positive=True),
    "precision": (
        lambda v: str(v) in PRECISIONS and isinstance(v, str | int),
        f"one of {', '.join(PRECISIONS)}",
    ),
    "num_sanity_val_steps": _int_at_least(-1),
    "enable_progress_bar": _BOOL,
    "enable_model_summary": _BOOL,
    "enable_checkpointing": _BOOL,
    "deterministic": (lambda v: isinstance(v, bool) or v == "warn", "true, false or warn"),
    "check_val_every_n_epoch": _int_at_least(1, nullable=True),
    "min_epochs": _int_at_least(0, nullable=True),
    "max_steps": _int_at_least(-1),
    "min_steps": _int_at_least(0, nullable=True),
    "overfit_batches": _batch_limit(positive=False),
    "fast_dev_run": (
        lambda v: isinstance(v, bool) or (_is_int(v) and v >= 0),
        "true, false or a number of batches",
    ),
    "detect_anomaly": _BOOL,
    "sync_batchnorm": _BOOL,
    "benchmark": (lambda v: v is None or isinstance(v, bool), "true, false or null"),
    "barebones": _BOOL,
    "inference_mode": _BOOL,
    "use_distributed_sampler": _BOOL,
    "reload_dataloaders_every_n_epochs": _int_at_least(0),
}
CHECKPOINT_IO = "sae.training.checkpoints.SafeCheckpointIO"

_PATH: Rule = (lambda v: isinstance(v, str) and v != "", "a path")
_OPTIONAL_TEXT: Rule = (lambda v: v is None or isinstance(v, str), "a string (or null)")
# The settings of this project's callbacks (conf/callbacks/), by their name there; a callback of
# the researcher's own (+callbacks.x._target_=...) is left to its class.
CALLBACK_RULES: dict[str, dict[str, Rule]] = {
    "linear_probe": {
        "max_iter": _int_at_least(1),
        "weight_decay": _number_in(0, FLOAT32_MAX, "[]"),
        "tolerance": _number_in(0, 1, "(]"),
        "cache_dir": _OPTIONAL_TEXT,
        "optimized_metric": _OPTIONAL_TEXT,
    },
    "model_checkpoint": {
        "dirpath": _PATH,
        "filename": _PATH,
        "auto_insert_metric_name": _BOOL,
        "monitor": (
            lambda v: v is None or (isinstance(v, str) and v.startswith(("val/", "train/"))),
            "a val/ or train/ metric (or null: the last epoch only)",
        ),
        "mode": _one_of(("min", "max")),
        "save_top_k": _int_at_least(-1),
        "save_last": _BOOL,
    },
    "run_figures": {"dirpath": _PATH},
    "save_on_interrupt": {"dirpath": _PATH},
    "epoch_visuals": {"num_images": _int_at_least(1)},
    "progress_bar": {"refresh_rate": _int_at_least(0)},
}


def _interpolation(value: Any) -> bool:
    return isinstance(value, str) and "${" in value


def check_callbacks(cfg: DictConfig) -> None:
    """The settings of this project's callbacks that a command may set (CALLBACK_RULES)."""
    callbacks = cfg.get("callbacks")
    if callbacks is None:
        return
    if not isinstance(callbacks, DictConfig):
        raise ConfigError(f"callbacks={_shown(callbacks)} must be the callbacks' settings (a config group)")
    for name, rules in CALLBACK_RULES.items():
        if name not in callbacks:
            continue
        # As written: an interpolation (`${output_dir}/plots`) is the config files' own, resolved at the run.
        values = OmegaConf.to_container(callbacks[name], resolve=False)
        values = {k: v for k, v in values.items() if not k.startswith("_") and not _interpolation(v)}
        check_settings(values, rules, lambda key, name=name: f"callbacks.{name}.{key}", f"callbacks.{name}")


def check_trainer(cfg: DictConfig, training: bool = True) -> None:
    """The trainer settings the module or the run depends on, and the keys Lightning's Trainer
    takes; the values not checked here are Lightning's to check (sae.training.fit.build_trainer)."""
    trainer = cfg.get("trainer")
    if trainer is None:
        return
    if not isinstance(trainer, DictConfig):
        raise ConfigError(f"trainer={_shown(trainer)} must be the trainer settings (a mapping)")
    keys = [k for k in trainer if k != "_target_"]
    known = TRAINER_ARGUMENTS
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise ConfigError(
            f"trainer.{unknown[0]} is not an argument of Lightning's Trainer{did_you_mean(unknown[0], known)}"
        )
    try:
        values = {k: trainer[k] for k in keys if k in TRAINER_RULES}
    except OmegaConfBaseException as err:
        raise ConfigError(f"trainer: {one_line(err)}") from err
    check_settings(values, TRAINER_RULES, lambda key: f"trainer.{key}", "the trainer")
    plugins = OmegaConf.to_container(trainer, resolve=False).get("plugins") or []
    targets = [p.get("_target_") for p in plugins if isinstance(p, dict)] if isinstance(plugins, list) else []
    if training and CHECKPOINT_IO not in targets:
        raise ConfigError(
            f"trainer.plugins={_shown(plugins)} must keep {CHECKPOINT_IO}: it writes checkpoints whole and "
            "reads them weights-only (a checkpoint is data, never code)"
        )
    # The module takes its optimizer steps itself (one per batch, several batches per call).
    for key, off in (("gradient_clip_val", (None, 0)), ("accumulate_grad_batches", (None, 1))):
        value = trainer.get(key)
        if value not in off:
            raise ConfigError(
                f"trainer.{key}={value!r} is not supported: the module steps its optimizer itself "
                "(Lightning's manual optimization); remove the override"
            )
    if training:
        _check_devices(cfg, trainer)
    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not _gpu_count():
        raise ConfigError(
            f"trainer.accelerator={accelerator} but torch sees no GPU: use accelerator=cpu, or "
            "accelerator=auto (a GPU when there is one)"
        )


def _check_devices(cfg: DictConfig, trainer: DictConfig) -> None:
    """Several processes (DDP) average gradients once per training call: one batch per call."""
    strategy = str(trainer.get("strategy") or "")
    devices = trainer.get("devices", 1)
    several = (_is_int(devices) and devices not in (0, 1)) or (
        isinstance(devices, ListConfig) and len(devices) > 1
    )
    several = several or (isinstance(devices, str) and devices not in ("1", "auto"))
    per_call = cfg.data.get("batches_per_call", 1) if "data" in cfg else 1
    if ("ddp" in strategy or several) and per_call != 1:
        why = (
            f"trainer.strategy={strategy}"
            if "ddp" in strategy
            else f"trainer.devices={devices} (a process each)"
        )
        raise ConfigError(
            f"data.batches_per_call={per_call} with {why}: DDP averages gradients once per training call, "
            "so it needs data.batches_per_call=1 (accelerator=ddp sets it)"
        )


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


MNIST_TEST_IMAGES = 10000
# Bytes per element of a (images x latent units) code matrix at the run's largest moment, measured
# (tests/test_config.py): the probe holds the training split's float32 codes and, while it
# standardises them, three float64 copies (28 bytes; one more for the measurement's noise), and per
# image a few float64 rows of class scores; the test split's codes are held by the probe, the figures
# and their worker (16 bytes).
PROBE_BYTES_PER_TRAIN_CODE = 29
PROBE_BYTES_PER_TRAIN_IMAGE = 400
FIGURE_BYTES_PER_TEST_CODE = 16
DATA_BYTES = 3 * MNIST_TRAIN_IMAGES * MNIST_PIXELS * 4  # the images as floats, and their splits


def memory_needed(cfg: DictConfig) -> tuple[int, str]:
    """Bytes a run needs at its largest, and what dominates: the weights with their gradients and
    Adam state, the data, and with the probe and figures the latent codes of whole splits."""
    needed, parts = _parameters(cfg) * 4 * 4 + DATA_BYTES, "weights, Adam state"
    callbacks = cfg.get("callbacks") or {}
    if "linear_probe" in callbacks:
        train_images = MNIST_TRAIN_IMAGES - cfg.data.val_size
        needed += train_images * (PROBE_BYTES_PER_TRAIN_CODE * cfg.latent_dim + PROBE_BYTES_PER_TRAIN_IMAGE)
        parts += ", the probe's codes of the training split"
    if "linear_probe" in callbacks or "run_figures" in callbacks:
        needed += FIGURE_BYTES_PER_TEST_CODE * MNIST_TEST_IMAGES * cfg.latent_dim
    return needed, parts


def _parameters(cfg: DictConfig) -> int:
    widths = [cfg.model.input_dim, *cfg.model.hidden_dims, cfg.latent_dim]
    return sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True)) * 2  # encoder, decoder


# What a run writes besides its checkpoints, at most (figures and their TensorBoard copies).
FIGURE_BYTES = 6 * 2**20
EPOCH_EVENT_BYTES = 100 * 2**10  # a validation epoch's histograms, images and scalars


def disk_needed(cfg: DictConfig) -> tuple[int, int]:
    """Bytes a run writes into its folder, at most, and a checkpoint's size: two checkpoints (best
    and last) and a third while one is replaced (written beside, then renamed), figures, events."""
    checkpoint = _parameters(cfg) * 4 * 3 + 2**16  # float32 weights and Adam's two moments
    return 3 * checkpoint + FIGURE_BYTES + cfg.epochs * EPOCH_EVENT_BYTES, checkpoint


def check_memory(cfg: DictConfig) -> None:
    """Refuse a run that cannot fit in this machine's memory at its largest moment (the probe's,
    for a wide code), before it trains: the kernel would kill it after training, losing the run."""
    needed, parts = memory_needed(cfg)
    available = _memory_bytes()
    if available and needed > 0.8 * available:
        raise ConfigError(
            f"latent_dim={cfg.latent_dim} (hidden_dims={list(cfg.model.hidden_dims)}) needs about "
            f"{needed / 2**30:.1f} GiB ({parts}), more than this machine's {available / 2**30:.1f} GiB "
            "can give: choose smaller layers, or drop the probe (~callbacks.linear_probe)"
        )


def _memory_bytes() -> int:
    """Physical memory of this machine (0 where the system does not say)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


CONF_DIR = Path(__file__).resolve().parents[1] / "conf"


def compose_train_config(overrides: list[str]) -> DictConfig:
    """conf/train.yaml composed with these overrides, as a command line composes it: with the
    running Hydra application's config search path, or this checkout's conf/ outside one. A
    composition error (an unknown preset, a key no config has) is a one-line ConfigError."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException

    try:
        if GlobalHydra.instance().is_initialized():
            return compose("train", overrides=overrides)
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            return compose("train", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"{' '.join(overrides)}: {one_line(err)}") from err


def command_overrides(cfg: DictConfig | None = None) -> list[str] | None:
    """The overrides the command line set (`beta=1e-3`, `+point=l1_beta1e-4`), from Hydra's record
    of it (in cfg, or of the job running); None when train(cfg) is called with a config Hydra did
    not run (then every value of cfg counts as meant)."""
    from hydra.core.hydra_config import HydraConfig

    if cfg is not None and cfg.get("hydra") is not None:  # composed with return_hydra_config=True
        return list(cfg.hydra.overrides.task)
    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return None


def command_override_keys(cfg: DictConfig | None = None) -> list[str] | None:
    """The keys of command_overrides (`beta`, `point`), without Hydra's +/~ prefixes."""
    overrides = command_overrides(cfg)
    return None if overrides is None else [override_key(o) for o in overrides]


def override_key(override: str) -> str:
    """`beta` of `beta=1e-3`, `point` of `+point=x`, `callbacks.x` of `~callbacks.x`."""
    return override.split("=", 1)[0].lstrip("+~")


# The arguments Lightning's Trainer takes (what `trainer.*` keys may be), written out so that a
# config is checked without importing Lightning; tests/test_config.py compares them with the
# installed release's Trainer (lightning is pinned in pyproject.toml).
TRAINER_ARGUMENTS = (
    *("accelerator", "strategy", "devices", "num_nodes", "precision", "logger", "callbacks"),
    *("fast_dev_run", "max_epochs", "min_epochs", "max_steps", "min_steps", "max_time"),
    *("limit_train_batches", "limit_val_batches", "limit_test_batches", "limit_predict_batches"),
    *("overfit_batches", "val_check_interval", "check_val_every_n_epoch", "num_sanity_val_steps"),
    *("log_every_n_steps", "enable_checkpointing", "enable_progress_bar", "enable_model_summary"),
    *("accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm", "deterministic"),
    *("benchmark", "inference_mode", "use_distributed_sampler", "profiler", "detect_anomaly"),
    *("barebones", "plugins", "sync_batchnorm", "reload_dataloaders_every_n_epochs"),
    *("default_root_dir", "enable_autolog_hparams", "model_registry"),
)
