"""Lightning callbacks that turn a run into something to look at: probe, figures, TensorBoard views.

They read the module and the data only through small documented interfaces: the module's
`hparams`, `encode`, `reconstruct`, `input_filters` and the codes its validation/test steps
return (see SparseAutoencoderModule), and the data module's `split(name)`. Lightning runs a
callback's epoch-end hook before the module's, so what the module computes at an epoch's end is
not there yet for callbacks of that epoch.
"""

from __future__ import annotations

import hashlib
import json
import signal
import sys
import threading
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from PIL import Image
from torch import Tensor

from sae.atomic import write_atomic, write_json_atomic
from sae.lightning_internals import tensorboard_file_writer
from sae.probe import linear_probe_accuracy

# The metrics the TensorBoard HParams tab shows next to each run's settings.
HPARAMS_METRICS = (
    "val/loss",
    "test/mse",
    "test/fvu",
    "test/rho_hat_mean",
    "test/l0",
    "test/dead_fraction",
    "test/probe_accuracy",
)


def tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
    """The run's TensorBoard logger; None without one, and on every process but rank 0 (under DDP
    the others have a stand-in that writes nothing)."""
    if trainer.global_rank != 0:
        return None
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


class LinearProbe(L.Callback):
    """At test time, logs the accuracy of a logistic-regression probe on the latent codes.

    `test/probe_accuracy` fits on the codes of the training split and scores on the test codes;
    `test/probe_accuracy_pixels` is the same probe on raw pixels, the baseline the codes are
    compared with. It depends only on the data, so it is cached in `cache_dir` (keyed by a hash
    of the data and the probe settings) and computed once per data set, not once per run.
    """

    def __init__(self, max_iter: int = 100, weight_decay: float = 1e-4, cache_dir: str | None = None) -> None:
        self.max_iter = max_iter
        self.weight_decay = weight_decay
        self.cache_dir = Path(cache_dir) if cache_dir else None

    def _probe(self, train: tuple[Tensor, Tensor], test: tuple[Tensor, Tensor]) -> float:
        return linear_probe_accuracy(*train, *test, max_iter=self.max_iter, weight_decay=self.weight_decay)

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        data = trainer.datamodule
        (train_x, train_y), (test_x, test_y) = data.split("train"), data.split("test")
        codes = (pl_module.encode(train_x), train_y), (pl_module.encode(test_x), test_y)
        pl_module.log("test/probe_accuracy", self._probe(*codes))
        pl_module.log("test/probe_accuracy_pixels", self._pixel_accuracy(train_x, train_y, test_x, test_y))

    def _pixel_accuracy(self, train_x: Tensor, train_y: Tensor, test_x: Tensor, test_y: Tensor) -> float:
        digest = hashlib.sha256(f"{self.max_iter}|{self.weight_decay}".encode())
        for t in (train_x, train_y, test_x, test_y):
            digest.update(t.detach().cpu().contiguous().numpy().tobytes())
        key = digest.hexdigest()[:32]
        path = self.cache_dir / "pixel_probe.json" if self.cache_dir else None
        cache = {}
        if path is not None and path.is_file():
            try:
                cache = json.loads(path.read_text())
            except (OSError, ValueError):
                cache = {}  # unreadable cache: recompute and overwrite
        if key not in cache:
            cache[key] = self._probe((train_x, train_y), (test_x, test_y))
            if path is not None:
                try:
                    write_json_atomic(path, cache)
                except OSError:
                    pass  # a read-only cache folder only costs the recomputation
        return cache[key]


class RunFigures(L.Callback):
    """After testing, writes the per-run figures as PNG to `dirpath` and to TensorBoard as images."""

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0:  # under DDP: one process draws and writes the figures
            return
        import matplotlib.pyplot as plt

        from sae.plots import run_figures

        images, labels = trainer.datamodule.split("test")
        sample = images[:16]
        figures = run_figures(
            images.cpu(),
            labels.cpu(),
            codes=pl_module.encode(images).cpu(),
            reconstructions=pl_module.reconstruct(sample).cpu(),
            filters=pl_module.input_filters().cpu(),
            rho=pl_module.hparams.rho,
        )
        self.dirpath.mkdir(parents=True, exist_ok=True)
        tb = tensorboard(trainer)
        for name, fig in figures.items():
            path = self.dirpath / f"{name}.png"
            write_atomic(path, lambda f, fig=fig: fig.savefig(f, format="png"))
            plt.close(fig)
            if tb is not None:  # the saved PNG itself: rendering the figure again costs as much
                image = np.asarray(Image.open(path).convert("RGB"))
                tb.experiment.add_image(f"figures/{name}", image, trainer.global_step, dataformats="HWC")


class EpochVisuals(L.Callback):
    """Each validation epoch, to TensorBoard: histograms of latent activations and of per-unit
    rho_hat, and originals above reconstructions of a fixed validation batch."""

    def __init__(self, num_images: int = 16) -> None:
        self.num_images = num_images
        self._codes: list[Tensor] = []

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._codes = []

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0):
        if isinstance(outputs, Tensor):
            self._codes.append(outputs.detach())

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tb = tensorboard(trainer)
        if tb is None or trainer.sanity_checking or not self._codes:
            return
        step = trainer.global_step  # the optimizer step, as for the val/* scalars
        codes = torch.cat(self._codes).float().cpu()  # this pass's codes of the whole split
        tb.experiment.add_histogram("val/latent_activation", codes, step)
        tb.experiment.add_histogram("val/rho_hat", codes.mean(dim=0), step)
        images = trainer.datamodule.split("val")[0][: self.num_images].to(pl_module.device)
        recon = pl_module.reconstruct(images)
        grid = torch.cat([images, recon]).reshape(-1, 1, 28, 28).cpu()  # originals, then reconstructions
        rows = torch.cat([torch.cat(list(half), dim=2) for half in grid.split(len(images))], dim=1)
        tb.experiment.add_image("val/reconstructions", rows, step)
        self._codes = []


class HParamsSummary(L.Callback):
    """Registers the run in TensorBoard's HParams tab with the knobs researchers compare.

    The metric values are the run's own scalars with these tags (val/loss per epoch, test/* at
    the end), which TensorBoard joins by tag; nothing is written as a placeholder metric, and
    there is no `hp_metric`.
    """

    def __init__(self, params: dict, metrics: list[str] | tuple[str, ...] = HPARAMS_METRICS) -> None:
        # Lists (hidden sizes, covered layers) become strings: HParams takes scalars only.
        self.params = {k: v if isinstance(v, int | float | str | bool) else str(v) for k, v in params.items()}
        self.metrics = list(metrics)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from torch.utils.tensorboard.summary import hparams

        tb = tensorboard(trainer)
        if tb is None:
            return
        experiment, start, end = hparams(self.params, dict.fromkeys(self.metrics, 0.0))
        writer = tensorboard_file_writer(tb.experiment)
        for summary in (experiment, start, end):
            writer.add_summary(summary)
        tb.experiment.flush()


def resumes_mid_epoch(loader) -> bool:
    """Whether a training loader records where in an epoch it is (sae.data.TensorBatches does;
    worker DataLoaders and the vectorized launcher's replay do not)."""
    return callable(getattr(loader, "state_dict", None)) and callable(
        getattr(loader, "load_state_dict", None)
    )


class SaveOnInterrupt(L.Callback):
    """Ctrl+C or SIGTERM during fit: stop at the next batch boundary and write checkpoints/last.ckpt.

    Lightning turns SIGTERM into an exception between batches by itself; Ctrl+C would land
    anywhere, even halfway through an optimizer step, so the first one only asks to stop and the
    stop happens before the next batch (a second Ctrl+C interrupts at once). The checkpoint then
    holds whole steps, and `resume=RUN_DIR` continues exactly where the run stopped.
    """

    def __init__(self, dirpath: str) -> None:
        self.dirpath = Path(dirpath)
        self._stop_requested = False
        self._previous_handler = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._stop_requested = False
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGINT, self._request_stop)

    def _request_stop(self, signum, frame) -> None:
        self._stop_requested = True
        self._restore_handler()  # a second Ctrl+C interrupts at once

    def _restore_handler(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGINT, self._previous_handler)
            self._previous_handler = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._stop_requested:
            raise KeyboardInterrupt  # between batches: every step so far is whole

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handler()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException):
        self._restore_handler()
        fitting = trainer.state.fn == TrainerFn.FITTING
        if not fitting or not isinstance(exception, KeyboardInterrupt | SIGTERMException):
            return
        path = self.dirpath / "last.ckpt"
        where = f"interrupted at step {trainer.global_step} (epoch {trainer.current_epoch})"
        if resumes_mid_epoch(trainer.train_dataloader):
            trainer.save_checkpoint(path)
            said = f"{where}: saved {path}"
        else:  # a checkpoint here would resume at the wrong batch: keep the last epoch's
            said = (
                f"{where}: the training data cannot resume mid-epoch, so {path} stays at the end of "
                "the last completed epoch"
            )
        print(
            f"{said}; continue with: python train.py resume={self.dirpath.parent}",
            file=sys.stderr,
            flush=True,
        )
