"""Lightning callbacks that turn a run into something to look at: probe, figures, TensorBoard views.

They read the module and the data only through small documented interfaces: the module's
`hparams`, `encode`, `reconstruct`, `input_filters`, the codes its validation/test steps
return, and `net`, the autoencoder itself (the probes take it, or a copy of it to a sweep's
worker; see SparseAutoencoderModule), and the data module's `split(name)`. Lightning runs a
callback's epoch-end hook before the module's, so what the module computes at an epoch's end is
not there yet for callbacks of that epoch.
"""

from __future__ import annotations

import copy
import signal
import sys
import threading
import time
import warnings
from functools import partial
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import ProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import Tensor, nn

from sae.config import command_override_keys
from sae.internals import tensorboard_file_writer
from sae.names import HPARAMS, metric_text
from sae.report.probe import ProbeData, probe_accuracies, probe_settings
from sae.run import handoff
from sae.run.console import report
from sae.run.record import RunRecord
from sae.training.loggers import LAYOUT, TARGET_TAG, tensorboard_tag, write_results


def progress_bar(refresh_rate: int = 5) -> ProgressBar:
    """A redrawn bar on a terminal; elsewhere (a log file, a SLURM job's output) one line per
    epoch, as a redrawn bar would write hundreds of lines there."""
    return TQDMProgressBar(refresh_rate=refresh_rate) if sys.stdout.isatty() else EpochLines()


class EpochLines(ProgressBar):
    """One line per epoch: its number, the training and validation loss, and its seconds."""

    def __init__(self) -> None:
        super().__init__()
        self._enabled = True
        self._started = 0.0

    def enable(self) -> None:
        self._enabled = True

    def disable(self) -> None:
        self._enabled = False

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self._enabled or trainer.global_rank != 0:
            return
        shown = {k: v for k, v in self.get_metrics(trainer, pl_module).items() if k.endswith("/loss")}
        values = ", ".join(f"{k} {metric_text(float(v))}" for k, v in shown.items())
        seconds = time.perf_counter() - self._started
        report(f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}: {values} ({seconds:.1f} s)")


def tensorboard(trainer: L.Trainer) -> TensorBoardLogger | None:
    """The run's TensorBoard logger; None without one, and on every process but rank 0 (under DDP
    the others have a stand-in that writes nothing)."""
    if trainer.global_rank != 0:
        return None
    return next((lg for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None)


def record_metrics(run: Path, events_dir: str | None, step: int, values: dict[str, float]) -> None:
    """Add metrics computed after the run wrote its metrics.json (a sweep job's hand-off): to its
    record, and with events_dir as TensorBoard scalars at `step`, in an event file of their own."""
    RunRecord(run).add_metrics(values)
    if events_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        with SummaryWriter(events_dir, filename_suffix=".probe") as writer:
            write_results(writer, values, step, title="test/probes")


class LinearProbe(L.Callback):
    """At test time, logs what a logistic-regression classifier reads off the codes and pixels.

    - `test/probe_accuracy`: fitted on the latent codes of the training split, scored on the
      test split's codes: how much class information the code keeps.
    - `test/probe_accuracy_pixels`: fitted on the training split's pixels, scored on the test
      images: the baseline for the line above.
    - `test/probe_accuracy_reconstructions`: that same pixel classifier scored on the test
      images' reconstructions: how much of what a downstream model needs survives the
      autoencoder (the analogue of "loss recovered" in SAE work on language models).

    The pixel classifier depends only on the data, so it is cached in `cache_dir` (keyed by a
    hash of the data and the probe settings) and fitted once per data set, not once per run
    (sae.report.probe.pixel_classifier). In a sweep whose jobs run one after another in this process,
    the three are computed in the worker process (sae.run.handoff) from a copy of the model while
    the next job trains, and join the job's metrics.json and TensorBoard when done (before the
    sweep's summary is final).

    - `val/probe_accuracy`: the code classifier scored on the validation split's codes, only when
      the sweep optimizes it (`optimized_metric=val/probe_accuracy`): a sweeper selects on
      validation metrics, never on the test split; it reads it at the job's end, so then the
      probes are computed in the job.
    """

    # The metric a sweeper may select on: the code probe scored on the validation split.
    SELECTABLE = "val/probe_accuracy"

    def __init__(
        self,
        max_iter: int = 100,
        weight_decay: float = 1e-4,
        tolerance: float = 1e-5,
        cache_dir: str | None = None,
        optimized_metric: str | None = None,
    ) -> None:
        self.max_iter = max_iter
        self.tolerance = tolerance
        self.weight_decay = weight_decay
        self.cache_dir = Path(cache_dir) if cache_dir else None
        self.optimized_metric = optimized_metric

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        data = trainer.datamodule
        inputs = ProbeData(*data.split("train"), *data.split("test"))
        settings = probe_settings(self)
        if self._hand_off(trainer, pl_module.net, inputs, settings):
            return
        val = data.split("val") if self.optimized_metric == self.SELECTABLE else None
        if val is not None and len(val[0]) == 0:
            val = None  # data.val_size=0: no validation split to score on
        for name, value in probe_accuracies(pl_module.net, inputs, **settings, val=val).items():
            pl_module.log(name, value)

    def _hand_off(self, trainer: L.Trainer, net: nn.Module, inputs: ProbeData, settings: dict) -> bool:
        """Hand the probes to the sweep's worker, if this is a sweep job that may; whether it did."""
        optimized = self.optimized_metric == self.SELECTABLE  # a sweeper reads it as the job ends
        if optimized or trainer.world_size > 1 or not handoff.more_jobs_follow():
            return False
        run = Path(trainer.default_root_dir).resolve()
        tb = tensorboard(trainer)
        events = tb.log_dir if tb is not None else None
        record = partial(record_metrics, run, events, trainer.global_step)
        model = copy.deepcopy(net).cpu().eval()  # this job's model as tested; the next job trains its own
        work = partial(probe_accuracies, **settings, threads=torch.get_num_threads())
        data = ProbeData(*(t.detach().cpu() for t in inputs))
        handoff.run_or_hand_off(f"{run}: probes", work, model, data, then=record, result_of=(run, "probes"))
        return True


class RunFigures(L.Callback):
    """After testing, writes the per-run figures as PNG to `dirpath` and to TensorBoard as images.

    In a sweep whose jobs run one after another in this process, the drawing is handed to a
    worker process (sae.run.handoff) and the next job starts training meanwhile. `events_dir` and
    `step`: where and at which optimizer step TensorBoard gets them, when not the trainer's own
    logger and step (evaluate.py completing a sweep job's figures afterwards).
    """

    def __init__(self, dirpath: str, events_dir: str | None = None, step: int | None = None) -> None:
        self.dirpath = Path(dirpath)
        self.events_dir = events_dir
        self.step = step

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0:  # under DDP: one process draws and writes the figures
            return
        from sae.report.figures import write_run_figures

        tb = tensorboard(trainer)
        events = self.events_dir or (tb.log_dir if tb is not None else None)
        step = trainer.global_step if self.step is None else self.step
        handoff.run_or_hand_off(
            str(self.dirpath.resolve()),
            write_run_figures,
            self.dirpath,
            figure_inputs(trainer, pl_module),
            events,
            step,
            result_of=(Path(trainer.default_root_dir), "figures"),
        )


def figure_inputs(trainer: L.Trainer, pl_module: L.LightningModule) -> dict:
    """What sae.report.figures.run_figures draws, from the tested module and the test split (CPU tensors)."""
    images, labels = trainer.datamodule.split("test")
    hp = pl_module.hparams
    return dict(
        images=images.cpu(),
        labels=labels.cpu(),
        codes=pl_module.encode(images).cpu(),
        reconstructions=pl_module.reconstruct(images[:16]).cpu(),
        filters=pl_module.input_filters().cpu(),
        rho=pl_module.method.target(),
        l0_threshold=hp.l0_threshold,
        densities={name: d.cpu() for name, (_, d) in pl_module.unit_activity("test").items()},
        decoded_units=pl_module.decoded_units().cpu(),
        rare_below=hp.rare_density,
        dense_above=hp.dense_density,
        setting=pl_module.setting(),
    )


class EpochVisuals(L.Callback):
    """Each validation epoch, to TensorBoard: histograms of latent activations and of per-unit
    rho_hat, originals above reconstructions of a fixed validation batch, and the method's target
    rho (if it has one); at the start, the Custom Scalars layout that draws related curves on one
    chart (sae.training.loggers.LAYOUT)."""

    def __init__(self, num_images: int = 16) -> None:
        self.num_images = num_images
        self._codes: list[Tensor] = []

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tb = tensorboard(trainer)
        if tb is not None:
            tb.experiment.add_custom_scalars(LAYOUT)

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
        if (target := pl_module.method.target()) is not None:
            tb.experiment.add_scalar(TARGET_TAG, target, step)
        self._codes = []


class HParamsSummary(L.Callback):
    """Registers the run in TensorBoard's HParams tab with the knobs researchers compare, and
    records how the run ended.

    The tab lists the knobs the command set first (flagged as differing; its server then sorts by
    name), shows integers as integers (recorded as text: the tab prints every number with five
    significant digits, seed 0 as 0.0000), and the metrics in the order the sweep's summary ranks
    by (sae.names.HPARAMS), by name (`test/mse`). Their values are the run's own scalars (written
    under sae.training.loggers.tensorboard_tag), which TensorBoard joins by tag; nothing is written
    as a placeholder metric, and there is no `hp_metric`. A row's trial id leads with the knobs the
    run set, then where its folder is (the tab shows ten characters' width of it).

    The session's status is written when the run ends: success after the test, failure when
    training raises (a NaN loss, a crash), unknown when Ctrl+C or SIGTERM stopped it (resumable;
    the HParams plugin has no "aborted"); a run killed outright records none, which TensorBoard
    shows as unknown too.
    """

    def __init__(self, params: dict, metrics: list[str] | tuple[str, ...] = HPARAMS) -> None:
        # Lists (hidden sizes, covered layers) and integers become text: see above.
        self.params = {k: v if isinstance(v, float | str | bool) else str(v) for k, v in params.items()}
        self.metrics = list(metrics)
        self._open = False  # a session started in this process and not yet ended

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        tb = tensorboard(trainer)
        if tb is None:
            return
        knobs = command_knobs(self.params)
        params = {k: self.params[k] for k in knobs} | self.params
        trial = trial_id(Path(tb.log_dir), Path(trainer.default_root_dir))
        writer = tensorboard_file_writer(tb.experiment)
        for summary in hparams_summaries(params, knobs, self.metrics, trial):
            writer.add_summary(summary)
        tb.experiment.flush()
        self._open = True

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end(trainer, "STATUS_SUCCESS")

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        stopped = isinstance(exception, KeyboardInterrupt | SIGTERMException)  # to be resumed
        try:
            self._end(trainer, "STATUS_UNKNOWN" if stopped else "STATUS_FAILURE")
        except Exception as err:  # noqa: BLE001 -- never hide the run's own error behind this one
            warnings.warn(f"could not record the run's end in TensorBoard's HParams tab: {err}", stacklevel=1)

    def _end(self, trainer: L.Trainer, status: str) -> None:
        from tensorboard.plugins.hparams.api_pb2 import Status
        from tensorboard.plugins.hparams.plugin_data_pb2 import SessionEndInfo

        tb = tensorboard(trainer)
        if not self._open or tb is None:
            return
        end = SessionEndInfo(status=Status.Value(status), end_time_secs=time.time())
        tensorboard_file_writer(tb.experiment).add_summary(hparams_record(session_end_info=end))
        tb.experiment.flush()
        self._open = False


def command_knobs(params: dict) -> list[str]:
    """The keys of params that this command set (in a sweep: the swept ones, and any other it
    set), in the config's order: the sweep knobs lead it."""
    named = {key.split(".")[-1] for key in command_override_keys() or []}
    return [k for k in params if k in named]


def trial_id(events: Path, run: Path) -> str:
    """A run's row name in the HParams tab: the knobs its events folder is named by, then the last
    three parts of its run folder (a sweep's day, time and job), which keep it apart from the same
    setting run elsewhere (TensorBoard merges rows of one name)."""
    where = "/".join(run.resolve().parts[1:][-3:])  # not the root "/"
    knobs = events.resolve().relative_to((run / "tensorboard").resolve()).as_posix()
    return where if knobs == "." else f"{knobs} ({where})"


def hparams_summaries(params: dict, knobs: list[str], metrics: list[str], trial: str) -> tuple:
    """The HParams plugin's experiment and session-start records: `params` in their order, `knobs`
    flagged as differing (the tab lists those first and ticks the first five), the `metrics` by
    name in their order (the first five ticked), read from their tensorboard_tag."""
    from google.protobuf.struct_pb2 import Value
    from tensorboard.plugins.hparams.api_pb2 import DataType, Experiment, HParamInfo, MetricInfo, MetricName
    from tensorboard.plugins.hparams.plugin_data_pb2 import SessionStartInfo

    def kind(value: object) -> int:
        if isinstance(value, bool):
            return DataType.DATA_TYPE_BOOL
        return DataType.DATA_TYPE_FLOAT64 if isinstance(value, float) else DataType.DATA_TYPE_STRING

    def proto_value(value: float | str | bool) -> Value:
        if isinstance(value, bool):
            return Value(bool_value=value)
        return Value(number_value=value) if isinstance(value, float) else Value(string_value=value)

    experiment = Experiment(
        hparam_infos=[HParamInfo(name=k, type=kind(v), differs=k in knobs) for k, v in params.items()],
        metric_infos=[MetricInfo(name=MetricName(tag=tensorboard_tag(m)), display_name=m) for m in metrics],
    )
    start = SessionStartInfo(group_name=trial, start_time_secs=time.time())
    for k, v in params.items():
        start.hparams[k].CopyFrom(proto_value(v))
    return hparams_record(experiment=experiment), hparams_record(session_start_info=start)


def hparams_record(**content):
    """One record of TensorBoard's HParams plugin (an experiment, a session's start or end), as a
    Summary under the plugin's tag for it (tensorboard.plugins.hparams.metadata)."""
    from tensorboard.compat.proto.summary_pb2 import Summary, SummaryMetadata
    from tensorboard.plugins.hparams import metadata
    from tensorboard.plugins.hparams.plugin_data_pb2 import HParamsPluginData

    (field,) = content
    tag = {
        "experiment": metadata.EXPERIMENT_TAG,
        "session_start_info": metadata.SESSION_START_INFO_TAG,
        "session_end_info": metadata.SESSION_END_INFO_TAG,
    }[field]
    data = HParamsPluginData(version=metadata.PLUGIN_DATA_VERSION, **content)
    plugin = SummaryMetadata.PluginData(plugin_name=metadata.PLUGIN_NAME, content=data.SerializeToString())
    return Summary(value=[Summary.Value(tag=tag, metadata=SummaryMetadata(plugin_data=plugin))])


def resumes_mid_epoch(loader) -> bool:
    """Whether a training loader records where in an epoch it is (sae.data.mnist.TensorBatches does;
    worker DataLoaders and the vectorized launcher's replay do not)."""
    return callable(getattr(loader, "state_dict", None)) and callable(
        getattr(loader, "load_state_dict", None)
    )


class SaveOnInterrupt(L.Callback):
    """Ctrl+C or SIGTERM during fit: stop at the next batch boundary and write checkpoints/last.ckpt.

    Lightning turns SIGTERM into an exception between batches by itself; Ctrl+C would land
    anywhere, even halfway through an optimizer step, so the first one only asks to stop and the
    stop happens before the next batch (a second Ctrl+C interrupts at once). The checkpoint then
    holds whole steps, and `resume=RUN_DIR` continues exactly where the run stopped. The run
    folder's status.json says "interrupted" and how to continue (a sweep's summary shows it).
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
            trainer.save_checkpoint(path, weights_only=False)  # the whole training state, to resume
            said = f"{where}: saved {path}"
        else:  # a checkpoint here would resume at the wrong batch: keep the last epoch's
            said = (
                f"{where}: the training data cannot resume mid-epoch, so {path} stays at the end of "
                "the last completed epoch"
            )
        said = f"{said}; continue with: python train.py resume={self.dirpath.parent}"
        if trainer.is_global_zero:
            try:
                RunRecord(self.dirpath.parent).interrupted(said)
            except OSError:
                pass  # the line below still says it
        report(said, stream=sys.stderr)
