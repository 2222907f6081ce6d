"""Checks on a composed training config, run before any data is read or a model is built.

A mistyped override (rho=1.5, lr=0, model.recon_loss=mae) should cost the researcher one line
naming the key, the value and what is allowed, not a traceback from deep inside torch, and not a
run that trains on a meaningless objective.
"""

from __future__ import annotations

import math
from typing import Any

from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from sae.console import UserError
from sae.loss import RECONSTRUCTION_LOSSES
from sae.model import ACTIVATIONS, layer_names
from sae.sparsity import METHODS

HIDDEN_ACTIVATIONS = [a for a in ACTIVATIONS if a != "topk"]  # topk is the latent's, with k

MNIST_TRAIN_IMAGES = 60000
FLOAT32_MAX = 3.4028234663852886e38  # what the training precision (32-true) can hold
MAX_LR = FLOAT32_MAX * 0.1
MAX_SEED = 2**32 - 1  # numpy's seed range, which Lightning's seed_everything uses

# Group settings that follow a top-level knob. The YAML sets each to `${knob}`: the knob is the one
# spelling a researcher uses, and what sweeps, the HParams entry, metrics, the sweep summary and the
# vectorized launcher's grouping read. A copy set on its own is refused, naming the knob.
MIRRORS = {
    "model.latent_dim": "latent_dim",
    "model.k": "k",
    "model.rho": "rho",
    "model.beta": "beta",
    "model.lr": "lr",
    "data.seed": "seed",
    "data.batch_size": "batch_size",
    "trainer.max_epochs": "epochs",
    "trainer.default_root_dir": "output_dir",
}
# Renamed settings: the old key stays in the YAML as null, so that setting it (on the command line
# or in a preset) is a one-line error naming the new key; builders drop it (without_retired_keys).
RENAMED = {"data.batches_per_step": "data.batches_per_call"}


class ConfigError(UserError, ValueError):
    """An invalid config value; the message names the key, the value and what is allowed."""

    kind = "config error"


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check(ok: bool, key: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r} must be {allowed}")


def _raw(cfg: DictConfig, key: str):
    """The value at a dotted key as written (an interpolation stays `${...}`); None when absent."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent)
    if not isinstance(node, DictConfig) or leaf not in node:
        return None
    return OmegaConf.to_container(node, resolve=False)[leaf]


def check_one_spelling(cfg: DictConfig) -> None:
    """Refuse a group copy of a top-level knob set on its own, and a renamed key that is set."""
    for key, knob in MIRRORS.items():
        raw = _raw(cfg, key)
        if raw is not None and raw != f"${{{knob}}}":
            raise ConfigError(
                f"{key}={raw!r}: {key} follows the top-level knob {knob}, so set {knob}={raw} instead"
            )
    for old, new in RENAMED.items():
        raw = _raw(cfg, old)
        if raw is not None:
            raise ConfigError(f"{old} was renamed {new}: set {new}={raw} instead")


def without_retired_keys(node: DictConfig, group: str) -> DictConfig:
    """A copy of a config group (e.g. cfg.data for "data") without its renamed keys, to instantiate."""
    retired = [old.split(".", 1)[1] for old in RENAMED if old.startswith(f"{group}.")]
    if not any(key in node for key in retired):
        return node
    node = node.copy()
    with open_dict(node):
        for key in retired:
            node.pop(key, None)
    return node


def validate_train_config(cfg: DictConfig) -> None:
    """Raise ConfigError on the first invalid value among the knobs a researcher sets."""
    check_one_spelling(cfg)
    rho, beta, lr = cfg.rho, cfg.beta, cfg.lr
    _check(_is_number(rho) and 0 < rho < 1, "rho", rho, "a number in (0, 1)")
    _check(_is_number(beta) and 0 <= beta <= FLOAT32_MAX, "beta", beta, f"a number in [0, {FLOAT32_MAX:.3g}]")
    # Adam divides lr by 1 - beta1 = 0.1 at the first step, in float32.
    _check(_is_number(lr) and 0 < lr <= MAX_LR, "lr", lr, f"a number in (0, {MAX_LR:.3g}]")
    for key in ("latent_dim", "epochs", "batch_size"):
        _check(_is_int(cfg[key]) and cfg[key] >= 1, key, cfg[key], "an integer >= 1")
    seed_ok = cfg.seed is None or (_is_int(cfg.seed) and 0 <= cfg.seed <= MAX_SEED)
    _check(seed_ok, "seed", cfg.seed, f"an integer in [0, {MAX_SEED}] (or null)")
    threads = cfg.get("threads")
    ok = threads is None or (_is_int(threads) and threads >= 1)
    _check(ok, "threads", threads, "an integer >= 1 (or null)")

    model = cfg.model
    choices = {
        "recon_loss": RECONSTRUCTION_LOSSES,
        "activation": HIDDEN_ACTIVATIONS,
        "latent_activation": ACTIVATIONS,
        "output_activation": HIDDEN_ACTIVATIONS,
        "sparsity": METHODS,
    }
    for key, allowed in choices.items():
        _check(model[key] in allowed, f"model.{key}", model[key], f"one of {', '.join(allowed)}")
    method = METHODS[model.sparsity]
    _check(
        model.latent_activation in method.latent_activations,
        "model.latent_activation",
        model.latent_activation,
        f"one of {', '.join(method.latent_activations)} with sparsity={method.name}",
    )
    if model.latent_activation == "topk":
        k, width = model.get("k"), model.latent_dim
        _check(
            _is_int(k) and 1 <= k <= width,
            "k",
            k,
            f"an integer in [1, latent_dim={width}]: units kept per input",
        )
    _check(isinstance(model.get("auxk", False), bool), "model.auxk", model.get("auxk"), "true or false")
    if model.get("auxk"):
        _check(model.sparsity == "topk", "model.auxk", model.auxk, "false unless sparsity=topk")
        alpha, aux_k, after = model.auxk_alpha, model.auxk_k, model.auxk_dead_after
        _check(_is_number(alpha) and alpha >= 0, "model.auxk_alpha", alpha, "a number >= 0")
        ok = aux_k is None or (_is_int(aux_k) and 1 <= aux_k <= model.latent_dim)
        _check(ok, "model.auxk_k", aux_k, f"an integer in [1, latent_dim={model.latent_dim}] (or null)")
        _check(_is_int(after) and after >= 1, "model.auxk_dead_after", after, "an integer >= 1")
    if method.only_latent:
        layers = list(model.sparsity_layers)
        _check(layers == ["latent"], "model.sparsity_layers", layers, f"[latent] with sparsity={method.name}")
    for key in ("hidden_dims", "sparsity_layers"):
        value = model[key]
        example = "[128]" if key == "hidden_dims" else "[latent]"
        _check(isinstance(value, ListConfig | list), f"model.{key}", value, f"a list, e.g. {example}")
    hidden = list(model.hidden_dims)
    _check(
        all(_is_int(h) and h >= 1 for h in hidden), "model.hidden_dims", hidden, "integers >= 1, e.g. [128]"
    )
    names = layer_names(len(hidden))
    unknown = [name for name in model.sparsity_layers if name not in names]
    if unknown:
        raise ConfigError(
            f"model.sparsity_layers={list(model.sparsity_layers)}: {', '.join(map(str, unknown))} "
            f"not in this model's layers {', '.join(names)}"
        )

    for key in ("l0_threshold", "rare_density", "dense_density"):
        value = model[key]
        _check(_is_number(value) and 0 <= value <= 1, f"model.{key}", value, "a number in [0, 1]")
    also = model.l0_also_at
    _check(
        isinstance(also, ListConfig | list) and all(_is_number(t) and 0 <= t <= 1 for t in also),
        "model.l0_also_at",
        also,
        "a list of numbers in [0, 1], e.g. [0.05, 0.5]",
    )

    # The module takes its optimizer steps itself (one per batch, several batches per call).
    trainer = cfg.get("trainer") or {}
    for key, off in (("gradient_clip_val", (None, 0)), ("accumulate_grad_batches", (None, 1))):
        value = trainer.get(key)
        if value not in off:
            raise ConfigError(
                f"trainer.{key}={value!r} is not supported: the module steps its optimizer itself "
                "(Lightning's manual optimization); remove the override"
            )

    strategy = str(trainer.get("strategy") or "")
    if "ddp" in strategy and cfg.data.get("batches_per_call", 1) != 1:
        raise ConfigError(
            f"data.batches_per_call={cfg.data.batches_per_call} with trainer.strategy={strategy}: DDP "
            "averages gradients once per training call, so it needs data.batches_per_call=1 "
            "(accelerator=ddp sets it)"
        )

    accelerator = str(trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not _gpu_count():
        raise ConfigError(
            f"trainer.accelerator={accelerator} but torch sees no GPU: use accelerator=cpu, or "
            "accelerator=auto (a GPU when there is one)"
        )

    data = cfg.data
    for key, low in (("eval_batch_size", 1), ("num_workers", 0), ("batches_per_call", 1)):
        _check(_is_int(data[key]) and data[key] >= low, f"data.{key}", data[key], f"an integer >= {low}")
    _check(_is_int(data.split_seed), "data.split_seed", data.split_seed, "an integer")
    val_size = data.val_size
    allowed = f"an integer in [0, {MNIST_TRAIN_IMAGES}): images held out of the training set"
    _check(_is_int(val_size) and 0 <= val_size < MNIST_TRAIN_IMAGES, "data.val_size", val_size, allowed)
    check_memory(cfg)


def _gpu_count() -> int:
    import torch

    return torch.cuda.device_count()


def check_memory(cfg: DictConfig) -> None:
    """Refuse a run whose model or latent codes cannot fit in this machine's memory, before it trains.

    The largest allocations grow with the layer widths: the weights with their gradients and Adam
    state, and (with the linear probe) the latent codes of every training image, which the probe
    standardises into copies.
    """
    widths = [cfg.model.input_dim, *cfg.model.hidden_dims, cfg.latent_dim]
    params = sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True)) * 2  # encoder, decoder
    needed = params * 4 * 4  # float32 weights, gradients and Adam's two moments
    if "linear_probe" in (cfg.get("callbacks") or {}):
        needed += 3 * MNIST_TRAIN_IMAGES * cfg.latent_dim * 4
    available = _memory_bytes()
    if available and needed > 0.8 * available:
        raise ConfigError(
            f"latent_dim={cfg.latent_dim} (hidden_dims={list(cfg.model.hidden_dims)}) needs about "
            f"{needed / 2**30:.1f} GiB (weights, Adam state and the probe's codes), more than this "
            f"machine's {available / 2**30:.1f} GiB: choose smaller layers, or drop the probe "
            "(~callbacks.linear_probe)"
        )


def _memory_bytes() -> int:
    """Physical memory of this machine (0 where the system does not say)."""
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 0


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
    return None if overrides is None else [o.split("=", 1)[0].lstrip("+~") for o in overrides]
