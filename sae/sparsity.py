"""Sparsity methods: what makes a code sparse, one unit per method.

A method owns its penalty terms: named tensors of one batch's activations (what training
minimises, beside the reconstruction) and the same terms from a whole split's statistics (what
validation and test report). `sae.loss.objective` adds them, weighted, to the reconstruction;
training, validation, test and stacked training all call it, and logging iterates over the
names. A new method is a subclass registered with `@register` plus its `conf/sparsity/<name>.yaml`
(README, "Adding a sparsity method").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor

RHO_HAT_CLAMP = 1e-6

METHODS: dict[str, type[SparsityMethod]] = {}


def register(cls: type[SparsityMethod]) -> type[SparsityMethod]:
    """Make a method selectable by its `name` (model.sparsity=<name>)."""
    METHODS[cls.name] = cls
    return cls


def make_method(name: str, knobs: Mapping[str, Any], layers: Sequence[str]) -> SparsityMethod:
    if name not in METHODS:
        raise ValueError(f"model.sparsity={name!r} must be one of {', '.join(METHODS)}")
    return METHODS[name](knobs, layers)


class SparsityMethod:
    """A penalty on the activations of `layers` (by name: encoder_1.., latent, decoder_1..).

    `knobs` holds the numbers the method reads (rho, beta, ...): floats, or in stacked training
    one job's values as 0-d tensors inside a vmap, so terms must be plain tensor arithmetic.
    """

    name: ClassVar[str]
    batch_term_names: ClassVar[tuple[str, ...]]  # what batch_terms returns, in this order
    # Latent activations the method's terms are defined for (its conf/sparsity YAML sets one).
    latent_activations: ClassVar[tuple[str, ...]] = ("sigmoid", "relu")
    only_latent: ClassVar[bool] = False  # whether model.sparsity_layers must be [latent]

    def __init__(self, knobs: Mapping[str, Any], layers: Sequence[str]) -> None:
        self.knobs = dict(knobs)
        self.layers = list(layers)

    def batch_terms(self, activations: Mapping[str, Tensor], decoder_weight: Tensor) -> dict[str, Tensor]:
        """The penalty's terms on one batch, from the covered layers' activations; decoder_weight is
        the decoder's first layer (out_features x latent_dim): column j is what latent unit j writes."""
        raise NotImplementedError

    def split_terms(self, unit_means: Mapping[str, Tensor], decoder_weight: Tensor) -> dict[str, Tensor]:
        """The same terms over a whole split, from each covered layer's per-unit mean activation."""
        raise NotImplementedError

    def penalty(self, terms: Mapping[str, Tensor]) -> Tensor:
        """What the terms add to the loss (e.g. beta * kl)."""
        raise NotImplementedError


def kl_sparsity(rho: float | Tensor, rho_hat: Tensor) -> Tensor:
    """Sum over units of KL(rho || rho_hat_j) between Bernoulli distributions.

    rho_hat is clamped to [1e-6, 1 - 1e-6] so that a dead or saturated unit gives a large but
    finite penalty (and gradient) instead of inf/NaN.
    """
    q = rho_hat.clamp(RHO_HAT_CLAMP, 1.0 - RHO_HAT_CLAMP)
    p = torch.as_tensor(rho, dtype=q.dtype, device=q.device)
    return (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).sum()


@register
class KLSparsity(SparsityMethod):
    """beta * sum over covered layers and units of KL(rho || rho_hat_j): the reference notebook's.

    In training rho_hat_j is unit j's mean over the batch (`kl_batch`); in validation and test
    over the whole split (`kl`). KL is convex in rho_hat, so the mean of per-batch values is at
    least the whole-split value on the same data: the two are named apart.
    """

    name = "kl"
    latent_activations = ("sigmoid",)  # rho_hat must be a firing rate in (0, 1)
    batch_term_names = ("kl_batch",)

    def _kl(self, rho_hats: Sequence[Tensor]) -> Tensor:
        return sum(kl_sparsity(self.knobs["rho"], q) for q in rho_hats)

    def batch_terms(self, activations: Mapping[str, Tensor], decoder_weight: Tensor) -> dict[str, Tensor]:
        return {"kl_batch": self._kl([activations[n].mean(dim=0) for n in self.layers])}

    def split_terms(self, unit_means: Mapping[str, Tensor], decoder_weight: Tensor) -> dict[str, Tensor]:
        return {"kl": self._kl([unit_means[n] for n in self.layers])}

    def penalty(self, terms: Mapping[str, Tensor]) -> Tensor:
        return self.knobs["beta"] * sum(terms.values())


@register
class L1Sparsity(SparsityMethod):
    """beta * sum_j |z_j| * ||d_j||, averaged over samples: the sparse-coding penalty on the latent
    code z, each unit weighted by the norm of its decoder column d_j, so that the penalty cannot
    be dodged by shrinking codes and growing the decoder (as in SAE work since Bricken et al.).

    Its codes are non-negative (ReLU), so a split's mean of |z_j| is unit j's mean activation.
    """

    name = "l1"
    latent_activations = ("relu",)
    only_latent = True
    batch_term_names = ("l1",)

    def batch_terms(self, activations: Mapping[str, Tensor], decoder_weight: Tensor) -> dict[str, Tensor]:
        return {"l1": (activations["latent"].abs() @ decoder_weight.norm(dim=0)).mean()}

    def split_terms(self, unit_means: Mapping[str, Tensor], decoder_weight: Tensor) -> dict[str, Tensor]:
        return {"l1": unit_means["latent"] @ decoder_weight.norm(dim=0)}

    def penalty(self, terms: Mapping[str, Tensor]) -> Tensor:
        return self.knobs["beta"] * terms["l1"]


@register
class TopKSparsity(SparsityMethod):
    """Exactly the k largest pre-activations of each input stay (through a ReLU), the others are
    exactly 0: sparsity by construction (the `topk` latent activation), no penalty term. L0 is
    at most k (less where a kept pre-activation is negative)."""

    name = "topk"
    latent_activations = ("topk",)
    only_latent = True
    batch_term_names = ()

    def batch_terms(self, activations: Mapping[str, Tensor], decoder_weight: Tensor) -> dict[str, Tensor]:
        return {}

    def split_terms(self, unit_means: Mapping[str, Tensor], decoder_weight: Tensor) -> dict[str, Tensor]:
        return {}

    def penalty(self, terms: Mapping[str, Tensor]) -> float:
        return 0.0
