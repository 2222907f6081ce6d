"""The LightningModule: the training objective, and whole-split metrics for validation and test."""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric, Metric

from sae.core.captured import CapturedStep
from sae.core.loss import minimised, objective, split_objective, term_names, with_penalty
from sae.core.metrics import (
    FractionOfVarianceUnexplained,
    UnitActivity,
    density_summary,
    off_values,
    rho_hat_summary,
    truncate_codes,
)
from sae.core.model import ZERO_THRESHOLD_ACTIVATIONS, SparseAutoencoder
from sae.core.settings import RECONSTRUCTION_LOSSES, layer_names, settings_mapping
from sae.core.sparsity import make_method
from sae.errors import UserError
from sae.internals import count_optimizer_steps
from sae.names import metric_text

DEFAULT_SPARSITY = {"method": "kl", "rho": 0.05, "beta": 5e-3}  # the reference notebook's
# With log_every_n_steps=0 nothing is logged, but the loss is still checked this often.
UNLOGGED_CHECK_EVERY = 1000
# The first this many training images give each latent unit its off value (truncated_mse).
OFF_VALUE_IMAGES = 10_000


class SparseAutoencoderModule(L.LightningModule):
    """Loss = reconstruction (mse|bce) + the sparsity method's penalty (`sparsity`, default kl:
    beta * sum over covered layers of sum_j KL(rho || rho_hat_j)); see sae.core.loss and sae.core.sparsity.

    Every constructor argument is a plain value and is saved as a hyperparameter, so a checkpoint
    rebuilds its own model (evaluate.py needs no overrides) and loads with weights_only=True.

    What callbacks read (and nothing else of the module): `hparams`, `encode(images)` and
    `reconstruct(images)` for a whole split, `input_filters()`, `decoded_units()`,
    `unit_activity(split)` after a pass, `setting()` for figure titles, and the latent codes that
    validation_step and test_step return for their batch.
    """

    def __init__(
        self,
        input_dim: int = 784,
        hidden_dims: Sequence[int] = (128,),
        latent_dim: int = 32,
        activation: str = "relu",
        latent_activation: str = "sigmoid",
        output_activation: str = "sigmoid",
        recon_loss: str = "mse",
        sparsity: Mapping[str, Any] | None = None,
        sparsity_layers: Sequence[str] = ("latent",),
        lr: float = 1e-3,
        l0_threshold: float = 0.1,
        l0_also_at: Sequence[float] = (0.05, 0.5),
        rare_density: float = 1e-3,
        dense_density: float = 0.5,
    ) -> None:
        super().__init__()
        if recon_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"model.recon_loss={recon_loss!r} must be one of {RECONSTRUCTION_LOSSES}")
        hidden_dims, sparsity_layers, l0_also_at = list(hidden_dims), list(sparsity_layers), list(l0_also_at)
        # The method and its settings, one plain mapping (sae.core.sparsity): {"method": "kl", ...}.
        sparsity = settings_mapping(sparsity if sparsity is not None else DEFAULT_SPARSITY)
        # Reads the (list-converted) arguments above. logger=False: sae.training.callbacks.HParamsSummary
        # writes the TensorBoard HParams entry itself, with the sweep's knobs and final metrics.
        self.save_hyperparameters(logger=False)
        self.method = make_method(sparsity, sparsity_layers, latent_dim, self.activity_threshold("latent"))
        self.term_names = term_names(recon_loss, self.method)  # what training logs, in order
        self.net = SparseAutoencoder(
            input_dim,
            hidden_dims,
            latent_dim,
            activation,
            latent_activation,
            output_activation,
            sparsity_layers,
            getattr(self.method.settings, "k", None),  # the topk latent's units kept per input
            self.method.latent_options(),  # e.g. the jumprelu latent's kernel width
        )
        widths = dict(
            zip(layer_names(len(hidden_dims)), [*hidden_dims, latent_dim, *hidden_dims[::-1]], strict=True)
        )
        # Fresh metric objects per split, so validation during fit never mixes into test.
        self.split_metrics = nn.ModuleDict({split: self._make_metrics(widths) for split in ("val", "test")})
        # Training terms (term_names) of each step since they were last logged, on the device.
        self.automatic_optimization = False  # training_step takes one optimizer step per batch
        self._window = torch.empty(0, len(self.term_names))
        self._window_len = 0
        self._window_start = 0  # the optimizer step of the window's first row
        self._last_finite = ""  # the last logged window means, for the divergence message
        self._off_values: Tensor | None = None  # per latent unit: set as each validation and test starts
        # Whether to record the training step as one CUDA graph where that is valid (records_steps):
        # how the run executes, not what it trains, so not a hyperparameter (the cuda_graph knob).
        self.cuda_graph = True
        self._recorded: CapturedStep | None = None  # made as training starts, when records_steps()

    def setting(self) -> str:
        """The knobs that tell runs apart, for figure titles: method and its knobs, width, lr."""
        hp = self.hparams
        return f"sparsity={self.method.describe()}, latent_dim {hp.latent_dim}, lr {hp.lr:g}"

    def describe(self) -> str:
        """One line for the console: the network, its activations and sparsity setting, its size."""
        hp = self.hparams
        widths = [hp.input_dim, *hp.hidden_dims, hp.latent_dim, *hp.hidden_dims[::-1], hp.input_dim]
        size = sum(p.numel() for p in self.net.parameters())
        hidden = f"{hp.activation} hidden, " if hp.hidden_dims else ""
        return (
            f"model: {'-'.join(map(str, widths))}, {hidden}{hp.latent_activation} latent; "
            f"{self.setting()}; {size:,} parameters"
        )

    def fit_record(self) -> dict[str, float]:
        """What the method's and the latent's state say about the training that led to them (the
        weight or threshold scale target_l0 ended with, AuxK's revived latents), as fit/<name>."""
        latent = getattr(self.net.latent_activation, "fit_record", dict)
        return {**self.method.fit_record(), **latent()}

    def activity_threshold(self, layer: str) -> float:
        """Above what a unit of `layer` counts as active: 0 for ReLU-like layers (positive exactly
        when their input is), else `l0_threshold` (a sigmoid code is never exactly 0)."""
        hp = self.hparams
        activation = hp.latent_activation if layer == "latent" else hp.activation
        return 0.0 if activation in ZERO_THRESHOLD_ACTIVATIONS else float(hp.l0_threshold)

    def _make_metrics(self, widths: dict[str, int]) -> nn.ModuleDict:
        """Per split: reconstruction errors, and each hidden layer's unit activity (the latent's
        also at the extra L0 thresholds)."""
        activity = {
            name: UnitActivity(
                width,
                [self.activity_threshold(name), *(self.hparams.l0_also_at if name == "latent" else [])],
            )
            for name, width in widths.items()
        }
        return nn.ModuleDict(
            {
                "mse": MeanMetric(),
                "truncated_mse": MeanMetric(),
                "bce": MeanMetric(),
                "fvu": FractionOfVarianceUnexplained(self.hparams.input_dim),
                "activity": nn.ModuleDict(activity),
            }
        )

    def forward(self, x: Tensor):
        return self.net(x)

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        """Latent codes of a whole split (in chunks, on the module's device)."""
        return self.net.encode_all(images)

    @torch.no_grad()
    def reconstruct(self, images: Tensor) -> Tensor:
        return self.net(images.to(self.device)).recon

    @torch.no_grad()
    def decoded_units(self) -> Tensor:
        """Per latent unit, decode(that unit at 1, the others 0) - decode(all 0): what it writes."""
        off = torch.zeros(1, self.hparams.latent_dim, device=self.device)
        on = torch.eye(self.hparams.latent_dim, device=self.device)
        return self.net.decoder(on) - self.net.decoder(off)

    def _activity(self, split: str) -> dict[str, tuple[Tensor, Tensor]]:
        """Per hidden layer, over the split's last pass: (rho_hat, firing frequency at each of the
        layer's thresholds); see UnitActivity."""
        return {name: m.compute() for name, m in self.split_metrics[split]["activity"].items()}

    def unit_activity(self, split: str) -> dict[str, tuple[Tensor, Tensor]]:
        """Per hidden layer, over the split's last pass: (rho_hat, firing frequency at the layer's
        activity threshold), one value per unit."""
        return {name: (rho_hat, density[0]) for name, (rho_hat, density) in self._activity(split).items()}

    def input_filters(self) -> Tensor:
        """The first layer's weights, one row of input_dim per unit (what each unit looks at)."""
        return self.net.encoder[0][0].weight.detach()

    def training_step(self, batch: list | tuple[Tensor, Tensor], batch_idx: int) -> None:
        """One optimizer step per batch: `batch` is one (images, labels) batch or a list of them.

        MNISTDataModule hands over `data.batches_per_call` batches per call, so that Lightning's
        hooks around each call run once per group, while each batch still gets its own zero_grad,
        backward and optimizer step: the training is the same as one batch per call. The steps go
        through Lightning's manual_backward and optimizer wrapper (precision plugins, callbacks'
        step hooks, the step count).
        """
        batches = [batch] if isinstance(batch[0], Tensor) else batch
        if len(batches) > 1 and self.trainer.world_size > 1:
            # DDP averages gradients only in the first backward after each forward it wraps: the
            # other steps of the call would train each process apart, silently.
            raise NotWithDDP(
                "data.batches_per_call must be 1 with several processes (DDP): see accelerator=ddp"
            )
        optimizer = self.optimizers()
        written = None
        for x, _ in batches:
            if self._recorded is not None:
                terms = self._recorded(x)
                count_optimizer_steps(self.trainer, 1)  # taken past Lightning's optimizer wrapper
            else:
                loss, terms = self._loss_and_terms(x)
                optimizer.zero_grad()
                self.manual_backward(loss)
                optimizer.step()
            if (mean_loss := self._after_step(terms)) is not None:
                written = mean_loss
        self._end_call(written)

    def records_steps(self) -> bool:
        """Whether the training steps are recorded once as a CUDA graph and replayed
        (sae.core.captured): asked for (`cuda_graph`, on by default), on one CUDA device, in 32-bit
        precision (Lightning's mixed-precision scaling happens in the wrapper the graph skips)."""
        try:
            trainer = self.trainer
        except RuntimeError:  # a module on its own, not attached to a Trainer: no recording
            return False
        return (
            bool(self.cuda_graph)
            and self.device.type == "cuda"
            and trainer.world_size == 1
            and str(trainer.precision) == "32-true"
        )

    def _plain_step(self, x: Tensor) -> Tensor:
        """One optimizer step on x as the graph records it: forward, objective, backward and Adam's
        update, without Lightning's wrappers (Python that a replay would not run). Its terms."""
        loss, terms = self._loss_and_terms(x)
        loss.backward()
        self.optimizers().optimizer.step()
        return terms

    def _loss_and_terms(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """What a training step minimises on x, and its named terms (term_names) stacked, detached."""
        named = objective(self.hparams.recon_loss, self.method, self.net(x), x)
        return minimised(self.method, named), torch.stack(list(named.values())).detach()

    def _after_step(self, terms: Tensor) -> Tensor | None:
        """Keep the terms of the optimizer step just taken; every `log_every_n_steps` steps, write
        the window to the loggers and return its mean loss."""
        self._record(terms)
        every = self.trainer.log_every_n_steps
        if every and self.global_step % every == 0:
            return self._write_train_window()
        return None

    def _end_call(self, written: Tensor | None) -> None:
        """After a training call: the progress bar shows the latest window mean."""
        if written is not None:
            self.log("train/loss", written, prog_bar=True, logger=False)
        elif not self.trainer.log_every_n_steps and self._window_len >= UNLOGGED_CHECK_EVERY:
            self._stop_if_diverged()  # log_every_n_steps=0 logs nothing, but divergence is still caught
            self._window_len = 0

    def _record(self, terms: Tensor) -> None:
        """Keep one step's terms (term_names) in the window on the device: no host sync per step."""
        if self._window_len == 0:
            self._window_start = self.global_step - 1  # the optimizer step just taken
        if self._window_len == len(self._window) or self._window.device != terms.device:
            grown = torch.empty(max(2 * len(self._window), 64), len(self.term_names), device=terms.device)
            grown[: self._window_len] = self._window[: self._window_len]
            self._window = grown
        self._window[self._window_len].copy_(terms)
        self._window_len += 1

    def _write_train_window(self) -> Tensor:
        """Write the training terms, averaged over the steps since the last write, to the loggers.

        Every `trainer.log_every_n_steps` optimizer steps, at that step (the x-axis of the
        validation metrics and figures too). The values go to the loggers directly: `self.log`
        per key and step would cost more than the step itself; here there is one host sync per
        window. The same window tells which step, if any, went NaN or inf. Returns the mean loss.
        """
        self._stop_if_diverged()
        means = self._window[: self._window_len].mean(dim=0)
        named = dict(zip(self.term_names, means.tolist(), strict=True))
        values = with_penalty(named, self.hparams.recon_loss)
        terms = ", ".join(f"{k}={metric_text(v)}" for k, v in values.items())
        self._last_finite = f"{terms} (mean of {self._window_len} steps)"
        self._window_len = 0
        metrics = {f"train/{k}": v for k, v in values.items()} | {"epoch": self.current_epoch}
        for logger in self.loggers:
            logger.log_metrics(metrics, step=self.global_step)
        return means[0]

    def _log_step_axis(self) -> None:
        """Put this hook's logged metrics at the optimizer step, not at Lightning's count of calls."""
        self.log_dict({"step": float(self.global_step), "epoch": float(self.current_epoch)})

    def _stop_if_diverged(self) -> None:
        """Raise TrainingDiverged if a step in the current window had a NaN or inf loss term.

        One host sync per call. Called where the loggers write, and before validation and the end
        of each epoch, so no checkpoint ever stores the diverged weights: checkpoints/last.ckpt
        stays the last good one.
        """
        finite = torch.isfinite(self._window[: self._window_len]).all(dim=1)
        if bool(finite.all()):
            return
        step = self._window_start + int((~finite).nonzero()[0])
        checkpoint = self.trainer.checkpoint_callback
        kept = (
            "checkpoints/last.ckpt holds the last completed epoch"
            if checkpoint is not None and getattr(checkpoint, "last_model_path", "")
            else "no checkpoint was written (no epoch completed)"
        )
        raise TrainingDiverged(
            f"the training loss became NaN or inf at step {step} (epoch {self.current_epoch}); "
            f"last logged: {self._last_finite or 'none yet'}; try a lower lr or beta; {kept}"
        )

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The epochs the run is set to train: resume= continues to them unless told otherwise.
        checkpoint["epochs"] = self.trainer.max_epochs

    def on_fit_start(self) -> None:
        self.method.prepare(self._training_images())

    def on_train_start(self) -> None:
        # Training continued from a checkpoint (ckpt_path=) restores Adam's state with the lr it
        # had, and with whether it was capturable and fused where it was saved; the run trains at
        # the lr it records (its hyperparameter), as a fresh run would, and as this machine's step needs.
        optimizer = self.optimizers().optimizer
        recorded = self.records_steps()
        capturable = recorded and self.device.type == "cuda"  # on a CPU (tests): recording disabled
        for group in optimizer.param_groups:
            group["lr"] = self.hparams.lr
            group["capturable"] = capturable
            group["fused"], group["foreach"] = True, None
        if capturable:  # a capturable Adam counts its steps on the device
            for state in optimizer.state.values():
                if "step" in state:
                    state["step"] = state["step"].to(self.device, torch.float32)
        self._recorded = None
        if recorded:
            zero_grad = lambda: optimizer.zero_grad(set_to_none=True)  # noqa: E731
            self._recorded = CapturedStep(self._plain_step, zero_grad, capture=capturable)

    def on_validation_start(self) -> None:  # inside fit: before this epoch's checkpoint is written
        self._stop_if_diverged()

    def on_train_epoch_end(self) -> None:
        self._stop_if_diverged()

    @torch.no_grad()
    def latent_off_values(self) -> Tensor:
        """Per latent unit, its off value (sae.core.metrics.off_values) on the first OFF_VALUE_IMAGES
        training images: fitted on training data, like the probe, never on the split it scores."""
        codes = self.encode(self._training_images()[:OFF_VALUE_IMAGES])
        return off_values(codes, self.activity_threshold("latent"))

    def _training_images(self) -> Tensor:
        datamodule = self.trainer.datamodule
        if not callable(getattr(datamodule, "split", None)):
            raise UserError("the module reads the training split: pass a data module with split()")
        return datamodule.split("train")[0]

    def _eval_step(self, split: str, x: Tensor) -> Tensor:
        out = self.net(x, all_layers=True)
        metrics = self.split_metrics[split]
        # Per-sample means, averaged over samples: exactly the per-pixel mean over the split.
        metrics["mse"].update(F.mse_loss(out.recon, x, reduction="none").mean(dim=1))
        truncated = truncate_codes(out.code, self.activity_threshold("latent"), self._off_values)
        truncated_recon = self.net.decoder(truncated)
        metrics["truncated_mse"].update(F.mse_loss(truncated_recon, x, reduction="none").mean(dim=1))
        if self.hparams.recon_loss == "bce":
            metrics["bce"].update(F.binary_cross_entropy(out.recon, x, reduction="none").mean(dim=1))
        metrics["fvu"].update(out.recon, x)
        for name, m in metrics["activity"].items():
            m.update(out.activations[name])
        return out.code

    def _log_split(self, split: str) -> None:
        """Loss terms from whole-split statistics: the KL uses rho_hat over the split, not per batch.

        Unit activity per layer: metrics without a layer in their name are the latent's
        (`val/dead_fraction`); the other hidden layers' carry it (`val/encoder_1/dead_fraction`).
        """
        hp = self.hparams
        metrics = self.split_metrics[split]
        activity = self._activity(split)
        recon = metrics[hp.recon_loss].compute()
        rho_hat, density = activity["latent"]
        unit_means = {name: means for name, (means, _) in activity.items()}
        densities = {name: frequency[0] for name, (_, frequency) in activity.items()}
        values = split_objective(self.method, recon, unit_means, self.net.decoder_weight.detach(), densities)
        values.update(mse=metrics["mse"].compute(), fvu=metrics["fvu"].compute(), l0=density[0].sum())
        values["truncated_mse"] = metrics["truncated_mse"].compute()
        values.update({f"l0@{t:g}": d.sum() for t, d in zip(hp.l0_also_at, density[1:], strict=True)})
        if hp.recon_loss == "bce":
            values["bce"] = recon
        values.update(rho_hat_summary(rho_hat))
        values.update(density_summary(density[0], hp.rare_density, hp.dense_density))
        for name, (_, layer_density) in activity.items():
            if name != "latent":
                fractions = density_summary(layer_density[0], hp.rare_density, hp.dense_density)
                values[f"{name}/dead_fraction"] = fractions["dead_fraction"]
                values[f"{name}/dense_fraction"] = fractions["dense_fraction"]
        if split == "test":  # thresholds are part of these metrics' definitions: record them alongside
            values.update(
                l0_threshold=hp.l0_threshold, rare_density=hp.rare_density, dense_density=hp.dense_density
            )
        self.log(f"{split}/loss", values.pop("loss"), prog_bar=True)
        self.log_dict({f"{split}/{k}": v for k, v in values.items()})
        self._log_step_axis()

    def _reset_split(self, split: str) -> None:
        """Fresh states at the start of each pass (under the pass's own grad/inference mode)."""
        for metric in self.split_metrics[split].modules():
            if isinstance(metric, Metric):
                metric.reset()

    def on_validation_epoch_start(self) -> None:
        self._reset_split("val")
        self._calibrate()
        self._off_values = self.latent_off_values()

    def on_test_epoch_start(self) -> None:
        self._reset_split("test")
        self._calibrate()
        self._off_values = self.latent_off_values()

    @torch.no_grad()
    def _calibrate(self) -> None:
        """What the method estimates from training data before an evaluation (BatchTopK's
        threshold), with the weights evaluated, in batches of the training batch size."""
        hparams = getattr(self.trainer.datamodule, "hparams", {})
        self.method.calibrate(self.net, self._training_images(), int(hparams.get("batch_size", 128)))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step("val", batch[0])  # the codes, for callbacks' histograms

    def on_validation_epoch_end(self) -> None:
        self._log_split("val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        return self._eval_step("test", batch[0])

    def on_test_epoch_end(self) -> None:
        self._log_split("test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """Adam, fused: the update of all parameters as one kernel, on the CPU as on a GPU; the same
        update as the default multi-tensor one, rounded differently in the last bits, and faster
        (benchmarks/step_time.py measures both)."""
        capturable = self.records_steps() and self.device.type == "cuda"
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr, capturable=capturable, fused=True)


# Hooks that Lightning runs around each backward and optimizer step of manual optimization.
class NotWithDDP(UserError, ValueError):
    """A setting that several processes cannot train with (sae.config refuses it before a run)."""

    kind = "config error"


class TrainingDiverged(UserError, RuntimeError):
    """The training loss became NaN or inf; the message names the step and the last finite values."""


def module_defaults() -> dict[str, Any]:
    """SparseAutoencoderModule's arguments and their defaults (what an older checkpoint omits)."""
    defaults = {k: p.default for k, p in inspect.signature(SparseAutoencoderModule).parameters.items()}
    return defaults | {"sparsity": dict(DEFAULT_SPARSITY)}
