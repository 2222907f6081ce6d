"""A fully connected autoencoder whose forward pass exposes the activations the sparsity penalty needs."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from sae.core.control import L0Controller
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


class BatchTopK(nn.Module):
    """BatchTopK (Bussmann et al. 2024). In training: ReLU of the k * B largest entries of the whole
    batch of B rows, every other entry 0: k active units per row on average, more on rows that
    need them. At inference (eval mode): each entry kept above `threshold`, one number estimated
    from training batches (`estimate_threshold`), so a row's code does not depend on the others."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.k = k
        self.register_buffer("threshold", torch.zeros(()))

    def select(self, x: Tensor) -> Tensor:
        """The training selection: the k * len(x) largest entries of x over the batch, ReLU'd."""
        values, indices = x.flatten().topk(self.k * x.shape[0])
        return torch.zeros_like(x.flatten()).scatter(0, indices, torch.relu(values)).view_as(x)

    def forward(self, x: Tensor) -> Tensor:
        if self.training:
            return self.select(x)
        return x * (x > self.threshold)

    @torch.no_grad()
    def estimate_threshold(self, batches: Iterable[Tensor]) -> None:
        """The threshold: over training batches of pre-activations, the mean of each batch's
        smallest entry the training selection keeps (above 0), as Bussmann et al. estimate it."""
        smallest = []
        for pre in batches:
            kept = self.select(pre)
            if (kept > 0).any():
                smallest.append(kept[kept > 0].min())
        self.threshold.copy_(torch.stack(smallest).mean() if smallest else torch.zeros(()))

    def extra_repr(self) -> str:
        return f"k={self.k}"


class LifetimeTopK(nn.Module):
    """Winner-take-all lifetime sparsity (Makhzani and Frey 2015, the fully connected WTA
    autoencoder). In training: each unit keeps its round(rate * B) largest ReLU activations over
    a batch of B inputs (at least one), every other entry exactly 0, so each unit fires on at most
    a fraction `rate` of the batch and each input uses rate * width units on average. Gradients
    flow only through the kept entries. At inference (eval mode): the plain ReLU, the code the
    paper's classifier reads (dense: test/l0 counts it as it is)."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.rate = rate

    def winners(self, batch: int) -> int:
        """How many inputs of a batch of `batch` each unit keeps in training."""
        return min(batch, max(1, round(self.rate * batch)))

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(x)
        if not self.training:
            return x
        values, indices = x.topk(self.winners(x.shape[-2]), dim=-2)
        return torch.zeros_like(x).scatter(-2, indices, values)

    def extra_repr(self) -> str:
        return f"rate={self.rate:g}"


def rectangle(u: Tensor) -> Tensor:
    """The rectangle kernel: 1 where |u| < 1/2, else 0."""
    return (u.abs() < 0.5).to(u.dtype)


class JumpReLU(nn.Module):
    """JumpReLU (Rajamanoharan et al. 2024): x where x > theta_j, else 0, with a learned
    threshold theta_j > 0 per unit (stored as its log). The step has no gradient with respect to
    theta; training uses the paper's pseudo-derivative, a rectangle kernel of width `bandwidth`
    around the threshold: d/dtheta of the output is -(theta / bandwidth) * K((x - theta) / bandwidth)
    (and of the L0 count, `step`, -(1 / bandwidth) * K(...)). Written as straight-through terms
    whose value is 0 (`(theta - theta.detach())` times a constant), so vmap and CUDA graphs see
    plain tensor arithmetic."""

    def __init__(
        self,
        width: int,
        bandwidth: float = 1e-3,
        initial_threshold: float = 0.1,
        target_l0: float | None = None,
    ) -> None:
        super().__init__()
        self.bandwidth = bandwidth
        self.log_threshold = nn.Parameter(torch.full((width,), math.log(initial_threshold)))
        # With a target L0: every threshold times one scale, which each training forward pass
        # adapts toward it. Learning the thresholds through the L0 penalty alone moves them by
        # about Adam's lr per step (in log), too slowly to reach a chosen L0 in a short run.
        self.scale = None if target_l0 is None else L0Controller(target_l0, initial=1.0)

    @property
    def threshold(self) -> Tensor:
        theta = self.log_threshold.exp()
        return theta if self.scale is None else theta * self.scale.weight()

    def forward(self, x: Tensor) -> Tensor:
        theta = self.threshold
        gate, window = self._gate_and_window(x, theta, self.bandwidth)
        if self.scale is not None and self.training:
            self.scale.update(gate.sum(dim=-1).mean())
        return x * gate - theta.detach() * window  # d output / d theta: -(theta / bandwidth) * K

    @staticmethod
    def step_of(x: Tensor, theta: Tensor, bandwidth: float) -> Tensor:
        """Whether each entry of x is above its unit's threshold (their count is the L0), with the
        pseudo-derivative -(1 / bandwidth) * K((x - theta) / bandwidth) with respect to theta
        (none to x)."""
        gate, window = JumpReLU._gate_and_window(x, theta, bandwidth)
        return gate - window

    @staticmethod
    def _gate_and_window(x: Tensor, theta: Tensor, bandwidth: float) -> tuple[Tensor, Tensor]:
        """Whether x is above theta (no gradient), and the straight-through term of value 0 whose
        gradient with respect to theta is (1 / bandwidth) * K((x - theta) / bandwidth)."""
        gate = (x.detach() > theta.detach()).to(x.dtype)
        kernel = rectangle((x.detach() - theta.detach()) / bandwidth)
        return gate, (kernel / bandwidth) * (theta - theta.detach())

    def extra_repr(self) -> str:
        return f"width={len(self.log_threshold)}, bandwidth={self.bandwidth:g}"

    def fit_record(self) -> dict[str, float]:
        """With a target L0: the scale the thresholds ended with (fit/threshold_scale)."""
        return {} if self.scale is None else {"threshold_scale": float(self.scale.weight())}


ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,  # slope 0.01 below 0: a unit that stops firing still gets gradients
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "identity": nn.Identity,
    "topk": TopK,  # latent only, with the model's k
    "batchtopk": BatchTopK,  # latent only, with the model's k
    "jumprelu": JumpReLU,  # latent only, one threshold per unit
    "wta": LifetimeTopK,  # latent only, with its lifetime rate
}
assert tuple(ACTIVATIONS) == ACTIVATION_NAMES, "sae.core.settings names the activations a config may choose"


# Activations that are positive exactly when their input is: a unit of such a layer is active
# when its output is above 0. Other layers' units count as active above a threshold.
ZERO_THRESHOLD_ACTIVATIONS = ("relu", "leaky_relu", "gelu", "topk", "batchtopk", "jumprelu", "wta")


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
    # JumpReLU's per-unit thresholds as this forward read them (under functional_call, the job's
    # own, with their gradient); None for other latents.
    latent_threshold: Tensor | None = None


def _activation(name: str, width: int, k: int | None = None, options: dict | None = None) -> nn.Module:
    """Activation `name` for a layer of `width` units; a method's latent takes its k or `options`
    (its settings the activation needs: JumpReLU's kernel, WTA's rate)."""
    if name not in ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}")
    if name in ("topk", "batchtopk"):
        if k is None:
            raise ValueError(f"the {name} activation needs k (the units kept per input)")
        return ACTIVATIONS[name](k)
    if name == "jumprelu":
        return JumpReLU(width, **(options or {}))
    if name == "wta":
        return LifetimeTopK(**(options or {}))
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
        latent_options: dict | None = None,
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
            nn.Sequential(nn.Linear(w_in, w_out), _activation(act, w_out, k, latent_options))
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
                threshold = block[1].threshold if isinstance(block[1], JumpReLU) else None
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
            latent_threshold=threshold,
        )

    def latent_preactivation(self, x: Tensor) -> Tensor:
        """The latent layer's input to its activation, for x: the encoder alone."""
        return self.encoder[-1][0](self.encoder[:-1](x))

    @property
    def latent_activation(self) -> nn.Module:
        """The latent layer's activation module (BatchTopK's threshold, JumpReLU's thresholds)."""
        return self.encoder[-1][1]

    @property
    def decoder_weight(self) -> Tensor:
        """The decoder's first layer (out x latent): column j is what latent unit j writes. Read
        at call time, so under functional_call it is the job's own weights."""
        return self.decoder[0][0].weight
