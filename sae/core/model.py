"""A fully connected autoencoder whose forward pass exposes the activations the sparsity penalty needs."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from sae.core.settings import ACTIVATION_NAMES, layer_names


class TopK(nn.Module):
    """ReLU of each row's k largest entries; every other entry exactly 0 (k-sparse autoencoders,
    Makhzani and Frey 2013; Gao et al. 2024). Gradients flow only through the kept entries."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k

    def forward(self, x: Tensor) -> Tensor:
        values, indices = x.topk(self.k, dim=-1)
        return torch.zeros_like(x).scatter(-1, indices, torch.relu(values))

    def extra_repr(self) -> str:
        return f"k={self.k}"


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,  # slope 0.01 below 0: a unit that stops firing still gets gradients
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "identity": nn.Identity,
    "topk": TopK,  # latent only, with the model's k
}
assert tuple(ACTIVATIONS) == ACTIVATION_NAMES, "sae.core.settings names the activations a config may choose"


# Activations that are positive exactly when their input is: a unit of such a layer is active
# when its output is above 0. Other layers' units count as active above a threshold.
ZERO_THRESHOLD_ACTIVATIONS = ("relu", "leaky_relu", "gelu", "topk")


class AutoencoderOutput(NamedTuple):
    recon: Tensor
    code: Tensor
    activations: dict[str, Tensor]  # hidden layers by name: those the penalty covers, or all
    decoder_weight: Tensor  # the decoder's first layer (out x latent): column j is unit j's
    latent_preactivation: Tensor  # the latent layer's input to its activation
    # The decoder, codes -> reconstructions. Under torch.func.functional_call it runs on the
    # module's own weights, not the call's: a method that uses it is not stackable (nor one that
    # uses latent_layer).
    decode: Callable[[Tensor], Tensor]
    latent_input: Tensor  # what the latent layer reads: the last encoder hidden layer, or x
    latent_layer: Callable[[Tensor], Tensor]  # latent_input -> latent_preactivation


def _activation(name: str, k: int | None = None) -> nn.Module:
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    if name == "topk":
        if k is None:
            raise ValueError("the topk activation needs k (the units kept per input)")
        return TopK(k)
    return ACTIVATIONS[name]()


class SparseAutoencoder(nn.Module):
    """input -> hidden_dims -> latent_dim -> reversed(hidden_dims) -> input.

    The default (784, [128], 32, relu, sigmoid latent, sigmoid output) is the reference
    notebook's 784-128-32-128-784 network. A sigmoid latent keeps each code in (0, 1), so a
    unit's mean activation is a firing probability that the KL penalty can compare with rho.
    """

    def __init__(
        self,
        input_dim: int = 784,
        hidden_dims: Sequence[int] = (128,),
        latent_dim: int = 32,
        activation: str = "relu",
        latent_activation: str = "sigmoid",
        output_activation: str = "sigmoid",
        sparsity_layers: Sequence[str] = ("latent",),
        k: int | None = None,
    ) -> None:
        super().__init__()
        names = layer_names(len(hidden_dims))
        unknown = [name for name in sparsity_layers if name not in names]
        if unknown:
            raise ValueError(f"sparsity_layers {unknown} do not exist; this model has {names}")
        self.sparsity_layers = list(sparsity_layers)

        widths = [input_dim, *hidden_dims, latent_dim, *reversed(hidden_dims), input_dim]
        acts = (
            [activation] * len(hidden_dims)
            + [latent_activation]
            + [activation] * len(hidden_dims)
            + [output_activation]
        )
        blocks = [
            nn.Sequential(nn.Linear(w_in, w_out), _activation(act, k))
            for w_in, w_out, act in zip(widths[:-1], widths[1:], acts, strict=True)
        ]
        depth = len(hidden_dims) + 1
        self.encoder = nn.Sequential(*blocks[:depth])
        self.decoder = nn.Sequential(*blocks[depth:])
        self._names = names

    def encode(self, x: Tensor) -> Tensor:
        return self.encoder(x)

    @torch.no_grad()
    def encode_all(self, images: Tensor, chunk: int = 4096) -> Tensor:
        """Latent codes of a whole split, in chunks on the model's device (for probes and figures)."""
        device = next(self.parameters()).device
        return torch.cat([self.encode(part.to(device)) for part in images.split(chunk)])

    def forward(self, x: Tensor, all_layers: bool = False) -> AutoencoderOutput:
        """`activations` holds the layers the sparsity penalty covers, or with all_layers every
        hidden layer (what the whole-split metrics measure)."""
        wanted = self._names if all_layers else self.sparsity_layers
        covered: dict[str, Tensor] = {}
        h = x
        # Walk block by block so every hidden activation is available without hooks.
        # The output block is not a named hidden layer, hence strict=False (it runs below).
        for name, block in zip(self._names, [*self.encoder, *self.decoder], strict=False):
            if name == "latent":
                latent_input, latent_layer = h, block[0]
                pre = block[0](h)
                h = code = block[1](pre)
            else:
                h = block(h)
            if name in wanted:
                covered[name] = h
        recon = self.decoder[-1](h)
        return AutoencoderOutput(
            recon=recon,
            code=code,
            activations=covered,
            decoder_weight=self.decoder_weight,
            latent_preactivation=pre,
            decode=self.decoder,
            latent_input=latent_input,
            latent_layer=latent_layer,
        )

    @property
    def decoder_weight(self) -> Tensor:
        """The decoder's first layer (out x latent): column j is what latent unit j writes. Read
        at call time, so under functional_call it is the job's own weights."""
        return self.decoder[0][0].weight
