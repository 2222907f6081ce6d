"""The objective: reconstruction + the sparsity method's weighted penalty terms, all named.

One place for every loss term: training, validation, test and stacked training call
`objective` (one batch) or `split_objective` (whole-split statistics).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch.nn.functional as F
from torch import Tensor

from sae.core.settings import RECONSTRUCTION_LOSSES
from sae.core.sparsity import SparsityMethod, kl_sparsity  # noqa: F401 -- kl_sparsity: the KL, re-exported


def reconstruction_loss(kind: str, recon: Tensor, target: Tensor) -> Tensor:
    """Mean over every pixel of the batch, as nn.MSELoss / nn.BCELoss do by default."""
    if kind == "mse":
        return F.mse_loss(recon, target)
    if kind == "bce":
        return F.binary_cross_entropy(recon, target)
    raise ValueError(f"unknown reconstruction loss {kind!r}; expected one of {RECONSTRUCTION_LOSSES}")


def term_names(kind: str, method: SparsityMethod) -> tuple[str, ...]:
    """The names `objective` returns, in order: loss, the reconstruction, the method's terms."""
    return ("loss", kind, *method.batch_term_names)


def objective(kind: str, method: SparsityMethod, out, x: Tensor) -> dict[str, Tensor]:
    """One batch's loss and its named terms (`out`: the model's AutoencoderOutput for x).

    `loss` is reconstruction + penalty, the quantity validation reports as val/loss; a method's
    auxiliary terms (AuxK) are among the named terms, and `minimised` adds them."""
    recon = reconstruction_loss(kind, out.recon, x)
    terms = method.batch_terms(out, x)
    return {"loss": recon + method.penalty(terms), kind: recon, **terms}


def minimised(method: SparsityMethod, named: Mapping[str, Tensor]) -> Tensor:
    """What a training step minimises: the loss and the method's auxiliary terms."""
    return named["loss"] + method.auxiliary(named)


def with_penalty(named: Mapping[str, float], kind: str) -> dict[str, float]:
    """Logged terms (means over steps) with `penalty`, what the sparsity method adds to the loss:
    loss minus the reconstruction `kind` (means are linear, so it is the mean penalty). On the
    loss's own scale, unlike the raw term (e.g. kl_batch), so one chart reads all three."""
    return {**named, "penalty": named["loss"] - named[kind]}


def split_objective(
    method: SparsityMethod,
    recon: Tensor,
    unit_means: Mapping[str, Tensor],
    decoder_weight: Tensor,
    densities: Mapping[str, Tensor],
) -> dict[str, Tensor]:
    """The loss over a whole split from its statistics: reconstruction error and per-unit means
    (and the decoder's first layer, for methods that weigh units by their decoder columns)."""
    terms = method.split_terms(unit_means, decoder_weight, densities)
    penalty = method.penalty(terms)  # what the method adds to the loss, on the loss's scale
    return {"loss": recon + penalty, "penalty": penalty, **terms}
