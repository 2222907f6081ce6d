"""What the model and each sparsity method accept, in plain Python: sae.config checks a command's
settings against this before torch is imported, so that a mistyped value is answered at once
rather than after seconds of imports.

A sparsity method's settings are a frozen dataclass registered under the method's name
(`@register_settings`): its knobs with their defaults and their check, and what the method needs
of the model (the latent activations its terms are defined for, whether it covers only the
latent). The method itself (sae.core.sparsity) names its settings class as `Settings`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

FLOAT32_MAX = 3.4028234663852886e38  # what the training precision (32-true) can hold

# The model's activations by name (sae.core.model builds them); topk is the latent's, with k.
ACTIVATION_NAMES = (
    "relu",
    "leaky_relu",
    "sigmoid",
    "tanh",
    "gelu",
    "identity",
    "topk",
    "batchtopk",
    "jumprelu",
    "wta",
)
LATENT_ONLY_ACTIVATIONS = ("topk", "batchtopk", "jumprelu", "wta")  # a method's latent, with its settings
RECONSTRUCTION_LOSSES = ("mse", "bce")


def layer_names(num_hidden: int) -> list[str]:
    """Names of the hidden layers in forward order: encoder_1.., latent, decoder_1.. ."""
    return (
        [f"encoder_{i}" for i in range(1, num_hidden + 1)]
        + ["latent"]
        + [f"decoder_{i}" for i in range(1, num_hidden + 1)]
    )


class InvalidSetting(ValueError):
    """A method's setting out of its range: the key (within the method's settings), the value, and
    what it must be. The config's checks say it in one line under the key the user set."""

    def __init__(self, key: str, value: Any, allowed: str) -> None:
        super().__init__(f"{key}={value!r} must be {allowed}")
        self.key, self.value, self.allowed = key, value, allowed


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_weight(key: str, value: Any) -> None:
    """A penalty's weight: a finite number >= 0 (beta, auxk_alpha)."""
    if not (_number(value) and 0 <= value <= FLOAT32_MAX):
        raise InvalidSetting(key, value, f"a number in [0, {FLOAT32_MAX:.2g}]")


def check_units_kept(k: Any, latent_dim: int, meaning: str) -> None:
    """TopK's and BatchTopK's k: an integer from 1 to the latent's width."""
    if not (_int(k) and 1 <= k <= latent_dim):
        raise InvalidSetting("k", k, f"an integer in [1, latent_dim={latent_dim}]: {meaning}")


@dataclass(frozen=True)
class MethodSettings:
    """A method's knobs: plain values (numbers, bools, null), or in stacked training one job's
    values as 0-d tensors inside a vmap, so terms must be plain tensor arithmetic."""

    method: ClassVar[str]  # the name a config selects it by (model.sparsity.method)
    # Latent activations the method's terms are defined for (its conf/sparsity YAML sets one).
    latent_activations: ClassVar[tuple[str, ...]] = ("sigmoid", "relu")
    only_latent: ClassVar[bool] = False  # whether model.sparsity_layers must be [latent]
    # What target_l0 sets: "k" (TopK, BatchTopK: k is the L0), or what training adapts to reach
    # it (sae.core.control), in place of the configured value: L1's penalty weight "beta", KL's
    # rate "rho", JumpReLU's "threshold"; None: the method cannot be held to a target (refused).
    steers: ClassVar[str | None] = None

    # The latent L0 (active units per input, test/l0's count) the run is to end at; None: the
    # method's own knobs decide.
    target_l0: float | None = None

    def check(self, latent_dim: int) -> None:
        """Raise InvalidSetting on the first knob out of range (for a latent of this width)."""
        target = self.target_l0
        if target is not None and self.steers is None:
            raise InvalidSetting("target_l0", target, f"null: {self.method} has no way to reach a target L0")
        if target is not None and self.steers == "k" and not (_int(target) and 1 <= target <= latent_dim):
            raise InvalidSetting(
                "target_l0", target, f"an integer in [1, latent_dim={latent_dim}]: {self.method} sets k to it"
            )
        if target is not None and not (_number(target) and 0 < target <= latent_dim):
            raise InvalidSetting("target_l0", target, f"a number in (0, latent_dim={latent_dim}]")
        self.check_knobs(latent_dim)

    def check_knobs(self, latent_dim: int) -> None:
        """The method's own knobs (each class its own)."""

    def adapts_in_training(self) -> bool:
        """Whether training adapts the loss's weight (to reach target_l0): then the loss of one
        epoch does not compare with another's, and no epoch is chosen by it."""
        return self.target_l0 is not None and self.steers != "k"


SETTINGS: dict[str, type[MethodSettings]] = {}


def register_settings(cls: type[MethodSettings]) -> type[MethodSettings]:
    """Make a method's settings known by its name (what model.sparsity.method may be)."""
    SETTINGS[cls.method] = cls
    return cls


def method_settings(sparsity: Mapping[str, Any]) -> MethodSettings:
    """The settings a `{"method": name, <knob>: value, ...}` mapping gives; a method or knob that
    does not exist is an InvalidSetting naming it (the config's rules and a checkpoint's both go
    through here). The values are not checked yet: `.check(latent_dim)` does that."""
    if not isinstance(sparsity, Mapping) or sparsity.get("method") not in SETTINGS:
        method = sparsity.get("method") if isinstance(sparsity, Mapping) else sparsity
        raise InvalidSetting("method", method, f"one of {', '.join(SETTINGS)}")
    cls = SETTINGS[sparsity["method"]]
    knobs = {k: v for k, v in settings_mapping(sparsity).items() if k != "method"}
    fields = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in knobs if k not in fields]
    if unknown:
        said = ", ".join(sorted(fields, key=lambda f: f == "target_l0"))  # the method's own first
        raise InvalidSetting(unknown[0], knobs[unknown[0]], f"absent: {cls.method}'s settings are {said}")
    return cls(**knobs)


def settings_mapping(sparsity: Mapping[str, Any]) -> dict[str, Any]:
    """`sparsity` as the method reads it: with target_l0, TopK's and BatchTopK's k is the target
    (what a checkpoint then records)."""
    sparsity = dict(sparsity)
    cls = SETTINGS.get(sparsity.get("method"))
    if cls is not None and cls.steers == "k" and sparsity.get("target_l0") is not None:
        sparsity["k"] = sparsity["target_l0"]
    return sparsity


@register_settings
@dataclass(frozen=True)
class KLSettings(MethodSettings):
    method = "kl"
    latent_activations = ("sigmoid",)  # rho_hat must be a firing rate in (0, 1)
    # Its L0 follows rho, the rate every unit is pulled to: a stronger beta only holds each unit
    # to rho more tightly (measured: docs/target_l0.md), so target_l0 adapts rho.
    steers = "rho"

    rho: float = 0.05  # the target mean activation of each covered unit
    beta: float = 5e-3  # the penalty's weight

    def check_knobs(self, latent_dim: int) -> None:
        if not (_number(self.rho) and 0 < self.rho < 1):
            raise InvalidSetting("rho", self.rho, "a number in (0, 1)")
        check_weight("beta", self.beta)


@register_settings
@dataclass(frozen=True)
class L1Settings(MethodSettings):
    method = "l1"
    latent_activations = ("relu",)
    only_latent = True
    steers = "beta"

    beta: float = 5e-3  # the penalty's weight

    def check_knobs(self, latent_dim: int) -> None:
        check_weight("beta", self.beta)


@register_settings
@dataclass(frozen=True)
class TopKSettings(MethodSettings):
    method = "topk"
    latent_activations = ("topk",)
    only_latent = True
    steers = "k"

    k: int = 8  # latent units kept per input
    auxk: bool = False  # the auxiliary loss that revives dead latents (Gao et al. 2024)
    auxk_alpha: float = 1 / 32  # its weight (as Gao et al.)
    auxk_k: int | None = None  # dead latents each input may use (None: latent_dim // 2)
    auxk_dead_after: int = 10_000  # training inputs without firing after which a latent is dead

    def check_knobs(self, latent_dim: int) -> None:
        check_units_kept(self.k, latent_dim, "units kept per input")
        if not isinstance(self.auxk, bool):
            raise InvalidSetting("auxk", self.auxk, "true or false")
        check_weight("auxk_alpha", self.auxk_alpha)
        if not (self.auxk_k is None or (_int(self.auxk_k) and 1 <= self.auxk_k <= latent_dim)):
            raise InvalidSetting(
                "auxk_k", self.auxk_k, f"an integer in [1, latent_dim={latent_dim}] (or null)"
            )
        if not (_int(self.auxk_dead_after) and self.auxk_dead_after >= 1):
            raise InvalidSetting("auxk_dead_after", self.auxk_dead_after, "an integer >= 1")


@register_settings
@dataclass(frozen=True)
class BatchTopKSettings(MethodSettings):
    method = "batchtopk"
    latent_activations = ("batchtopk",)
    only_latent = True
    steers = "k"

    k: int = 8  # latent units kept per input, on average over a training batch

    def check_knobs(self, latent_dim: int) -> None:
        check_units_kept(self.k, latent_dim, "units kept per input on average")


@register_settings
@dataclass(frozen=True)
class JumpReLUSettings(MethodSettings):
    method = "jumprelu"
    latent_activations = ("jumprelu",)
    only_latent = True
    steers = "threshold"  # a scale of every unit's threshold (sae.core.model.JumpReLU)

    beta: float = 5e-3  # the weight of the L0 penalty (the paper's lambda)
    bandwidth: float = 1e-3  # the pseudo-derivative's kernel width (the paper's epsilon)
    initial_threshold: float = 0.1  # every unit's threshold at initialization

    def check_knobs(self, latent_dim: int) -> None:
        check_weight("beta", self.beta)
        if not (_number(self.bandwidth) and 0 < self.bandwidth <= 1):
            raise InvalidSetting("bandwidth", self.bandwidth, "a number in (0, 1]")
        if not (_number(self.initial_threshold) and 0 < self.initial_threshold <= 100):
            raise InvalidSetting("initial_threshold", self.initial_threshold, "a number in (0, 100]")


@register_settings
@dataclass(frozen=True)
class WTASettings(MethodSettings):
    method = "wta"
    latent_activations = ("wta",)
    only_latent = True
    # target_l0 is refused: the inference code is the plain ReLU, whose L0 training does not set
    # (the training code's L0 is rate * latent_dim on average).
    steers = None

    rate: float = 0.05  # the fraction of a training batch each latent unit keeps (lifetime sparsity)

    def check_knobs(self, latent_dim: int) -> None:
        if not (_number(self.rate) and 0 < self.rate <= 1):
            raise InvalidSetting("rate", self.rate, "a number in (0, 1]: the share of a batch a unit keeps")
