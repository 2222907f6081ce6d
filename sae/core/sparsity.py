"""Sparsity methods: what makes a code sparse, one unit per method.

A method owns its penalty terms: named tensors of one batch's forward pass (what training
minimises, beside the reconstruction) and the same terms from a whole split's statistics (what
validation and test report). `sae.core.loss.objective` adds them, weighted, to the reconstruction;
training, validation, test and stacked training all call it, and logging iterates over the
names. A method's settings (its knobs, their defaults and their check) are a frozen dataclass in
sae.core.settings, plain Python so that a config is checked before torch loads; the method names
it as `Settings`, the module takes the settings as one mapping, `{"method": <name>, <knob>:
<value>, ...}`, and checkpoints store that mapping. A new method is its settings class
(`@register_settings`), a subclass here (`@register`) and its `conf/sparsity/<name>.yaml`
(docs/design.md, "Adding a sparsity method").
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from sae.core.control import L0Controller
from sae.core.metrics import pixel_variance
from sae.core.model import AutoencoderOutput, JumpReLU
from sae.core.settings import (
    SETTINGS,
    BatchTopKSettings,
    JumpReLUSettings,
    KLSettings,
    L1Settings,
    MethodSettings,
    TopKSettings,
    WTASettings,
    method_settings,
)

RHO_HAT_CLAMP = 1e-6
# With target_l0, the weight training starts from: small enough that the code starts dense (a
# weight too strong at the start kills ReLU units for good).
L0_CONTROL_START = 1e-6
Units = Mapping[str, Tensor]  # a per-unit statistic of each covered layer, by layer name

METHODS: dict[str, type[SparsityMethod]] = {}


def register(cls: type[SparsityMethod]) -> type[SparsityMethod]:
    """Make a method selectable by its settings' name (model.sparsity.method=<name>)."""
    name = cls.Settings.method
    if SETTINGS.get(name) is not cls.Settings:
        raise TypeError(f"{cls.__name__}.Settings is not registered: decorate it with @register_settings")
    cls.name = name
    METHODS[name] = cls
    return cls


def make_method(
    sparsity: Mapping[str, Any], layers: Sequence[str], latent_dim: int, active_above: float = 0.0
) -> SparsityMethod:
    """The method `sparsity` names, with its settings, covering `layers`; a latent unit counts
    as active (for target_l0) above `active_above`, as test/l0 counts it."""
    settings = method_settings(sparsity)
    method = METHODS[settings.method](settings, layers, latent_dim)
    method.active_above = float(active_above)
    return method


class SparsityMethod(nn.Module):
    """A penalty on the activations of `layers` (by name: encoder_1.., latent, decoder_1..), with
    its `settings` (a `Settings` instance). A method is a module of the LightningModule: state it
    keeps across steps (a registered buffer) is checkpointed and resumed with the weights.
    """

    Settings: ClassVar[type[MethodSettings]]  # registered in sae.core.settings
    name: ClassVar[str]  # the settings' name, set by @register
    batch_term_names: ClassVar[tuple[str, ...]]  # what batch_terms returns, in this order

    def __init__(self, settings: MethodSettings, layers: Sequence[str], latent_dim: int) -> None:
        super().__init__()
        self.settings = settings
        self.layers = list(layers)
        self.active_above = 0.0  # a latent unit above this counts in L0 (make_method sets it)

    @classmethod
    def stacks(cls, settings: Mapping[str, Any]) -> bool:
        """Whether runs with these settings may train as one stacked model (the vectorized launcher):
        not when the method keeps state of its own across steps, which is one run's (a weight
        adapted to a target L0)."""
        return not method_settings(settings).adapts_in_training()

    def describe(self) -> str:
        """The method and its knobs in a few words, for the console and figure titles."""
        return self.name

    def latent_options(self) -> dict[str, Any] | None:
        """What the method's own latent activation is built with, beside k (JumpReLU's)."""
        return None

    def calibrate(self, net: nn.Module, training_images: Tensor, batch_size: int) -> None:
        """Before each evaluation: estimate from training data what the model's inference needs
        (BatchTopK's threshold), with the current weights. Most methods need nothing."""

    def target(self) -> float | None:
        """The mean activation the method pulls each unit to (KL's rho), if it has one."""
        return None

    def batch_terms(self, out: AutoencoderOutput, x: Tensor) -> dict[str, Tensor]:
        """The penalty's terms on one batch x, from the model's output for it: `out.activations`
        (the covered layers, by name) and `out.decoder_weight` (the decoder's first layer,
        out_features x latent_dim: column j is what latent unit j writes) are what most need."""
        raise NotImplementedError

    def split_terms(self, unit_means: Units, decoder_weight: Tensor, densities: Units) -> dict[str, Tensor]:
        """The same terms over a whole split, from each covered layer's per-unit mean activation
        and firing frequency (the fraction of the split's inputs it is active on)."""
        raise NotImplementedError

    def penalty(self, terms: Mapping[str, Tensor]) -> Tensor:
        """What the terms add to the loss (e.g. beta * kl)."""
        raise NotImplementedError

    def auxiliary(self, terms: Mapping[str, Tensor]) -> Tensor | float:
        """What training minimises beside the loss (TopK's AuxK): a term validation does not
        have, kept out of `loss` so that train/loss and val/loss are the same quantity."""
        return 0.0

    def prepare(self, training_inputs: Tensor) -> None:
        """Statistics of the training inputs the method needs before its first step (none here)."""

    def fit_record(self) -> dict[str, float]:
        """What the method's state says about the training that led to it, for metrics.json as
        `fit/<name>` (TopK's AuxK: latents dead and revived)."""
        return {}


def kl_sparsity(rho: float | Tensor, rho_hat: Tensor) -> Tensor:
    """Sum over units of KL(rho || rho_hat_j) between Bernoulli distributions.

    rho_hat is clamped to [1e-6, 1 - 1e-6] so that a dead or saturated unit gives a large but
    finite penalty (and gradient) instead of inf/NaN.
    """
    q = rho_hat.clamp(RHO_HAT_CLAMP, 1.0 - RHO_HAT_CLAMP)
    # A float becomes a 0-d tensor filled on q's device (as_tensor would copy it from the host,
    # and on a GPU every such copy waits for the queued work: one stall per training step).
    p = rho if isinstance(rho, Tensor) else torch.full((), rho, dtype=q.dtype, device=q.device)
    return (p * torch.log(p / q) + (1 - p) * torch.log((1 - p) / (1 - q))).sum()


class PenaltyMethod(SparsityMethod):
    """A method whose loss adds beta * its terms (KL, L1, JumpReLU). With target_l0, the knob its
    settings steer (`steers`: L1's beta, KL's rho) is the controller's (L0Controller) in place of
    the configured one, logged as `train/<knob>` with the batch L0 it steers by as `train/l0`."""

    settings: KLSettings | L1Settings | JumpReLUSettings

    def __init__(self, settings: MethodSettings, layers: Sequence[str], latent_dim: int) -> None:
        super().__init__(settings, layers, latent_dim)
        self.controller: L0Controller | None = None
        self.steered = settings.steers if settings.target_l0 is not None else None
        if self.steered == "beta":  # from small: a weight too strong at the start kills ReLU units
            self.controller = L0Controller(float(settings.target_l0), initial=L0_CONTROL_START, high=1e4)
        elif self.steered == "rho":  # a firing rate: from the configured one, within (0, 0.5]
            self.controller = L0Controller(
                float(settings.target_l0),
                initial=float(settings.rho),
                sparser_as_it_grows=False,
                low=1e-4,
                high=0.5,
            )
        if self.controller is not None:
            self.batch_term_names = (*self.batch_term_names, self.steered, "l0")

    def knob(self, name: str) -> Tensor | float:
        """A knob's value now: the configured one, or the controller's if it steers this one."""
        return self.controller.weight() if name == self.steered else getattr(self.settings, name)

    def steer(self, out: AutoencoderOutput) -> dict[str, Tensor]:
        """With a controller: the steered knob's value this batch trains with and the batch's L0
        (as terms, e.g. `beta` and `l0`), and in training the controller's step on that L0."""
        if self.controller is None:
            return {}
        value = self.controller.weight()
        l0 = (out.code > self.active_above).float().sum(dim=-1).mean()
        if self.training:
            self.controller.update(l0)
        return {self.steered: value, "l0": l0}

    def _weight_text(self) -> str:
        target = self.settings.target_l0
        return f"beta {self.settings.beta:g}" if target is None else f"target L0 {target:g}"

    def penalised(self, terms: Mapping[str, Tensor]) -> Tensor:
        """The terms the weight multiplies: all but the controller's."""
        return sum(v for k, v in terms.items() if k not in (self.steered, "l0"))

    def penalty(self, terms: Mapping[str, Tensor]) -> Tensor:
        return terms.get("beta", self.knob("beta")) * self.penalised(terms)

    def fit_record(self) -> dict[str, float]:
        return {} if self.controller is None else {self.steered: float(self.controller.weight())}

    def reached_bound(self) -> str | None:
        """The steered knob, if its controller ended at a bound (the target out of its reach)."""
        return self.steered if self.controller is not None and self.controller.at_bound() else None


@register
class KLSparsity(PenaltyMethod):
    """beta * sum over covered layers and units of KL(rho || rho_hat_j): the reference notebook's.

    In training rho_hat_j is unit j's mean over the batch (`kl_batch`); in validation and test
    over the whole split (`kl`). KL is convex in rho_hat, so the mean of per-batch values is at
    least the whole-split value on the same data: the two are named apart.
    """

    Settings = KLSettings
    settings: KLSettings
    batch_term_names = ("kl_batch",)

    def describe(self) -> str:
        if self.settings.target_l0 is not None:
            return f"kl (beta {self.settings.beta:g}, target L0 {self.settings.target_l0:g})"
        return f"kl (rho {self.settings.rho:g}, beta {self.settings.beta:g})"

    def target(self) -> float:
        return float(self.knob("rho"))

    def _kl(self, rho: Tensor | float, rho_hats: Sequence[Tensor]) -> Tensor:
        return sum(kl_sparsity(rho, q) for q in rho_hats)

    def batch_terms(self, out: AutoencoderOutput, x: Tensor) -> dict[str, Tensor]:
        steered = self.steer(out)  # with target_l0: rho, the rate this batch trains toward
        rho = steered.get("rho", self.settings.rho)
        return {"kl_batch": self._kl(rho, [out.activations[n].mean(dim=0) for n in self.layers]), **steered}

    def split_terms(self, unit_means: Units, decoder_weight: Tensor, densities: Units) -> dict[str, Tensor]:
        return {"kl": self._kl(self.knob("rho"), [unit_means[n] for n in self.layers])}


def l1_terms(codes: Tensor, decoder_weight: Tensor) -> Tensor:
    """Mean over samples of sum_j |z_j| * ||d_j||, d_j column j of decoder_weight."""
    return (codes.abs() @ decoder_weight.norm(dim=0)).mean()


@register
class L1Sparsity(PenaltyMethod):
    """beta * sum_j |z_j| * ||d_j||, averaged over samples: the sparse-coding penalty on the latent
    code z, each unit weighted by the norm of its decoder column d_j, so that the penalty cannot
    be dodged by shrinking codes and growing the decoder (as in SAE work since Bricken et al.).

    Its codes are non-negative (ReLU), so a split's mean of |z_j| is unit j's mean activation.
    """

    Settings = L1Settings
    settings: L1Settings
    batch_term_names = ("l1",)

    def describe(self) -> str:
        return f"l1 ({self._weight_text()})"

    def batch_terms(self, out: AutoencoderOutput, x: Tensor) -> dict[str, Tensor]:
        return {"l1": l1_terms(out.activations["latent"], out.decoder_weight), **self.steer(out)}

    def split_terms(self, unit_means: Units, decoder_weight: Tensor, densities: Units) -> dict[str, Tensor]:
        return {"l1": unit_means["latent"] @ decoder_weight.norm(dim=0)}


class SparseByConstruction(SparsityMethod):
    """A method whose latent activation makes the code sparse (TopK, BatchTopK): no penalty term."""

    def batch_terms(self, out: AutoencoderOutput, x: Tensor) -> dict[str, Tensor]:
        return {}

    def split_terms(self, unit_means: Units, decoder_weight: Tensor, densities: Units) -> dict[str, Tensor]:
        return {}

    def penalty(self, terms: Mapping[str, Tensor]) -> float:
        return 0.0


@register
class TopKSparsity(SparseByConstruction):
    """Exactly the k largest pre-activations of each input stay (through a ReLU), the others are
    exactly 0: sparsity by construction (the `topk` latent activation), no penalty term. L0 is
    at most k (less where a kept pre-activation is negative).

    With `auxk` (model.sparsity.auxk=true), the auxiliary loss of Gao et al. (2024) revives dead latents,
    weighted as their reference code (openai/sparse_autoencoder, train.py) weighs it. A latent is
    dead after `auxk_dead_after` training inputs without firing, counted with this batch (the
    reference takes the mask after its counter update too). On each batch the `auxk_k` largest
    pre-activations among the dead latents (through a ReLU) are asked to explain what the live
    code leaves unexplained, e = x - recon (held fixed):

        auxk = mean (e - e_hat)^2 / mean (e - batch mean of e)^2,
        e_hat = decode(z + z_aux) - decode(z),

    z the live code (held fixed): the reference's normalized_mse. For a linear decoder e_hat is
    W_dec z_aux, Gao et al.'s term; this form keeps that meaning for a nonlinear one, where the
    decoder's bias cancels (the reference's bias also learns from the term). The dead
    latents' pre-activations are recomputed from the latent layer's input held fixed, so AuxK's
    gradient reaches the dead latents' own weights (the latent layer's rows) and the decoder, as
    in Gao et al.'s one-layer encoder, and never the encoder layers the live latents share.

    Gao et al. minimise mse / Var(x) + auxk_alpha * auxk, Var(x) the training inputs' per-pixel
    variance (averaged over pixels). The reconstruction here is the raw MSE, so that train/mse
    compares across methods: the auxiliary term is weighted auxk_alpha * Var(x), which makes the
    loss Var(x) times theirs, the same gradient direction and, under Adam, the same steps.

    It logs `train/auxk`, `train/auxk_dead` (latents dead by the window) and
    `train/auxk_revived` (latents that fired again after being dead: 0 means AuxK did nothing);
    the objective's `loss` leaves the auxiliary term out, so `train/loss` and `val/loss` are the
    same quantity. The counters are buffers, checkpointed and resumed with the weights.
    """

    Settings = TopKSettings
    settings: TopKSettings
    batch_term_names = ()

    def __init__(self, settings: TopKSettings, layers: Sequence[str], latent_dim: int) -> None:
        super().__init__(settings, layers, latent_dim)
        self.auxk = bool(settings.auxk)
        self.input_variance: float | None = None  # of the training inputs: prepare() sets it
        if self.auxk:
            self.batch_term_names = ("auxk", "auxk_dead", "auxk_revived")
            self.auxk_k = int(settings.auxk_k or latent_dim // 2)
            self.register_buffer("inputs_since_fired", torch.zeros(latent_dim))
            # 1 for each latent that has been dead (by the window) / has fired again since.
            self.register_buffer("was_dead", torch.zeros(latent_dim))
            self.register_buffer("revived", torch.zeros(latent_dim))

    @classmethod
    def stacks(cls, settings: Mapping[str, Any]) -> bool:
        return super().stacks(settings) and not settings.get("auxk")  # the dead-latent counter is one run's

    def describe(self) -> str:
        return f"topk (k {self.settings.k}{', AuxK' if self.auxk else ''})"

    def prepare(self, training_inputs: Tensor) -> None:
        if self.auxk:
            self.input_variance = pixel_variance(training_inputs)

    def batch_terms(self, out: AutoencoderOutput, x: Tensor) -> dict[str, Tensor]:
        if not self.auxk:
            return {}
        if self.training:
            with torch.no_grad():
                fired = (out.code > 0).any(dim=0).float()
                self.was_dead.masked_fill_(self._dead(), 1)
                self.revived.add_(self.was_dead * fired).clamp_(max=1)
                self.inputs_since_fired.add_(len(x)).mul_(1 - fired)
        dead = self._dead()  # counted with this batch, as the reference does
        # The auxk_k largest dead pre-activations, from the latent layer's input held fixed; a live
        # unit is -inf, so kept only when fewer than auxk_k are dead, and then 0 after the ReLU: no
        # host sync for the count.
        pre = out.latent_layer(out.latent_input.detach()).masked_fill(~dead, float("-inf"))
        values, indices = pre.topk(min(self.auxk_k, pre.shape[-1]), dim=-1)
        z_aux = torch.zeros_like(pre).scatter(-1, indices, torch.relu(values))
        z = out.code.detach()
        residual = (x - out.recon).detach()
        e_hat = out.decode(z + z_aux) - out.decode(z)
        spread = (residual - residual.mean(dim=0)).pow(2).mean().clamp_min(1e-12)
        auxk = (residual - e_hat).pow(2).mean() / spread
        return {
            "auxk": auxk,
            "auxk_dead": dead.sum().to(auxk.dtype),
            "auxk_revived": self.revived.sum().to(auxk.dtype),
        }

    def auxiliary(self, terms: Mapping[str, Tensor]) -> Tensor | float:
        if "auxk" not in terms:
            return 0.0
        if self.input_variance is None:
            raise RuntimeError("AuxK weighs its term by the training inputs' variance: call prepare() first")
        return self.settings.auxk_alpha * self.input_variance * terms["auxk"]

    def fit_record(self) -> dict[str, float]:
        if not self.auxk:
            return {}
        return {"auxk_dead": float(self._dead().sum()), "auxk_revived": float(self.revived.sum())}

    def _dead(self) -> Tensor:
        """The latents dead by AuxK's window: auxk_dead_after training inputs without firing."""
        return self.inputs_since_fired >= float(self.settings.auxk_dead_after)


@register
class BatchTopKSparsity(SparseByConstruction):
    """BatchTopK (Bussmann et al. 2024): in training, the k * B largest latent pre-activations of a
    batch of B inputs stay (through a ReLU), so k units per input on average; at inference each
    unit is active above one threshold, estimated from training batches before every evaluation
    (`calibrate`: the mean over training batches of the smallest value the selection keeps,
    with the current weights). Sparsity by construction (the `batchtopk` latent), no penalty.
    The threshold is a buffer of the model: checkpoints keep the one it was tested with."""

    Settings = BatchTopKSettings
    settings: BatchTopKSettings
    batch_term_names = ()

    def describe(self) -> str:
        return f"batchtopk (k {self.settings.k})"

    def calibrate(self, net: nn.Module, training_images: Tensor, batch_size: int) -> None:
        device = next(net.parameters()).device
        whole = len(training_images) // batch_size * batch_size or len(training_images)  # whole batches
        batches = training_images[:whole].split(batch_size)
        net.latent_activation.estimate_threshold(net.latent_preactivation(b.to(device)) for b in batches)


@register
class JumpReLUSparsity(PenaltyMethod):
    """JumpReLU (Rajamanoharan et al. 2024): the latent is x * H(x - theta_j), each unit's threshold
    theta_j learned, and the penalty beta * L0, the mean over inputs of the count of active units,
    trained through the paper's pseudo-derivative with respect to the thresholds (a rectangle
    kernel of width `bandwidth`; sae.core.model.JumpReLU). `l0_batch` is the batch's L0 (as
    trained); over a whole split, `l0_penalized` is the sum of the units' firing frequencies, the
    same count as `test/l0`."""

    Settings = JumpReLUSettings
    settings: JumpReLUSettings
    batch_term_names = ("l0_batch",)

    def describe(self) -> str:
        return f"jumprelu ({self._weight_text()})"

    def latent_options(self) -> dict[str, Any]:
        settings = self.settings
        return {
            "bandwidth": settings.bandwidth,
            "initial_threshold": settings.initial_threshold,
            "target_l0": settings.target_l0,
        }

    def batch_terms(self, out: AutoencoderOutput, x: Tensor) -> dict[str, Tensor]:
        if out.latent_threshold is None:
            raise RuntimeError("jumprelu needs the jumprelu latent activation")
        step = JumpReLU.step_of(out.latent_preactivation, out.latent_threshold, self.settings.bandwidth)
        return {"l0_batch": step.sum(dim=-1).mean(), **self.steer(out)}

    def split_terms(self, unit_means: Units, decoder_weight: Tensor, densities: Units) -> dict[str, Tensor]:
        return {"l0_penalized": densities["latent"].sum()}


@register
class WTASparsity(SparseByConstruction):
    """Winner-take-all lifetime sparsity (Makhzani and Frey 2015): in training each latent unit
    keeps its `rate` fraction of largest activations over the batch (the `wta` latent,
    sae.core.model.LifetimeTopK), so every unit learns from the inputs it explains best and none
    can stay silent; at inference the code is the plain ReLU. No penalty term. Its codes are what
    docs/results.md's best probe reads (experiment=best_probe)."""

    Settings = WTASettings
    settings: WTASettings
    batch_term_names = ()

    def describe(self) -> str:
        return f"wta (rate {self.settings.rate:g})"

    def latent_options(self) -> dict[str, Any]:
        return {"rate": self.settings.rate}
