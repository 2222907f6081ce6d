"""`train(cfg)`: the whole training pipeline, from a composed config to metrics.json.

`python train.py` calls it through a thin Hydra wrapper, the tests call it in-process, and the
vectorized launcher calls it for every job (with the job's epochs replayed from a stacked fit).
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ProgressBar, Timer
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, ListConfig, OmegaConf

from sae.config import command_overrides, data_settings, disk_needed, model_settings, validate_train_config
from sae.core.settings import method_settings
from sae.data.mnist import MNISTDataModule
from sae.internals import guard_checkpoint_restore
from sae.run.console import closing_lines, format_metrics, report, tidy_library_output
from sae.run.folder import check_free_space, remove_leftover_temporary_files, writing_run_folder
from sae.run.handoff import pending_results
from sae.run.record import RunRecord, plain_numbers
from sae.training.checkpoints import checkpoint_to_resume, last_checkpoint_path, refuse_restore
from sae.training.loggers import tensorboard_run_name
from sae.training.module import SparseAutoencoderModule


class Replay(Protocol):
    """A job's training epochs computed elsewhere (sae.sweep.stacked.JobRecord: the vectorized
    launcher's stacked fit), attached to the job's module in place of its own training steps."""

    stacked_seconds: float  # the stacked fit's time, which its jobs shared
    stacked_jobs: int

    def attach(
        self, module: SparseAutoencoderModule, datamodule: L.LightningDataModule
    ) -> L.LightningModule: ...


def train(cfg: DictConfig, replay: Replay | None = None) -> dict[str, Any]:
    """Fit, test the best checkpoint, and write <output_dir>/metrics.json; return its contents.

    With `replay` (the vectorized launcher) the training epochs come from a stacked run's record
    instead of being computed here; everything else is the same.
    """
    tidy_library_output()
    cfg, resumed_with = settled_config(cfg)
    resume_from = checkpoint_to_resume(cfg)  # checked before anything is written
    output_dir = Path(cfg.output_dir)
    with writing_run_folder(output_dir):
        needed, checkpoint = disk_needed(cfg)
        check_free_space(
            output_dir, needed, f"checkpoints of {checkpoint / 2**20:.1f} MiB, figures, TensorBoard"
        )
        if cfg.get("resume"):
            remove_leftover_temporary_files(output_dir / "checkpoints")  # of writes a kill interrupted
            report(f"resuming {output_dir} from checkpoints/last.ckpt")
        metrics, rank = _train(cfg, resume_from, replay)
        metrics["resumed_from"] = str(Path(resume_from).resolve()) if resume_from else None
        if resumed_with:  # settings the resume changed (e.g. more epochs)
            metrics["resumed_with"] = " ".join(f"{k}={v}" for k, v in resumed_with.items())
        _record(cfg, metrics, rank_zero=rank == 0)
    return metrics


def settled_config(cfg: DictConfig) -> tuple[DictConfig, dict[str, Any]]:
    """The run's config, composed in full, then validated, then frozen (read-only): nothing after
    this changes a setting. Composing includes a resume (`resume=DIR`, or a SLURM requeue): the
    run's own recorded command and its checkpoint's checked settings, in the run's own folder;
    and the TensorBoard version named from the command. Returns the settings a resume changed."""
    cfg = copy.deepcopy(cfg)  # the caller's config is left as it was given
    validate_train_config(cfg)
    if not cfg.get("resume") and requeued_by_slurm(Path(cfg.output_dir)):
        report(f"SLURM restarted this job (preempted or requeued): it continues from {cfg.output_dir}")
        cfg.resume = cfg.output_dir
    resumed_with: dict[str, Any] = {}
    if cfg.get("resume"):  # the run's own settings; a change the command asks for is refused or applied
        from sae.training.resume import resumed_config

        cfg, resumed_with = resumed_config(cfg, command_overrides(cfg))
        validate_train_config(cfg)  # the run's recorded command and checkpoint values, composed in
        # resume=DIR continues the run in its own folder: checkpoints, TensorBoard, metrics.
        cfg.output_dir = cfg.resume
    cfg.output_dir = str(Path(cfg.output_dir).resolve())
    checkpoint = (cfg.get("callbacks") or {}).get("model_checkpoint")
    if checkpoint is not None and checkpoint.get("monitor") and adapts_in_training(cfg):
        # Its val/loss weighs the penalty by each epoch's own weight: the last epoch is tested.
        checkpoint.monitor, checkpoint.save_top_k = None, 0
    tensorboard = (cfg.get("logger") or {}).get("tensorboard")
    if tensorboard is not None and tensorboard.get("version") == "":  # "": not set by the user
        tensorboard.version = tensorboard_run_name(cfg, Path(cfg.output_dir))
    OmegaConf.set_readonly(cfg, True)
    return cfg, resumed_with


def adapts_in_training(cfg: DictConfig) -> bool:
    """Whether the run's loss weight changes during training (target_l0 with a penalty method)."""
    return method_settings(model_settings(cfg)["sparsity"]).adapts_in_training()


def _train(cfg: DictConfig, resume_from: str | None, replay: Replay | None) -> tuple[dict[str, Any], int]:
    """Build, fit and test; the run's metrics, and this process's rank (DDP: 0 writes the record)."""
    use_thread_count(cfg)
    datamodule, module = build_data_and_module(cfg)
    report(module.describe())
    if replay is not None:
        module = replay.attach(module, datamodule)
    # No validation split (e.g. experiment=seed_notebook): nothing to validate or monitor.
    trainer = build_trainer(cfg, **({"limit_val_batches": 0} if cfg.data.val_size == 0 else {}))

    with srun_hint_silenced(cfg.trainer):
        trainer.fit(module, datamodule=datamodule, ckpt_path=resume_from)
    # Time in the training loop (with its validation), summed over the run's resumes: the Timer's
    # state travels in the checkpoints. Read now: testing a checkpoint restores its callbacks' state.
    fit_seconds = fit_timer(trainer).time_elapsed("train")
    metrics = _test(trainer, module, datamodule, Path(cfg.output_dir))
    if trainer.global_rank == 0:  # the tested model's dictionary, for sae.report.consistency
        RunRecord(cfg.output_dir).save_dictionary(module.decoded_units().cpu().numpy())
    metrics["fit/seconds"] = fit_seconds
    metrics["fit/epochs"] = trainer.current_epoch
    metrics["fit/threads"] = torch.get_num_threads()
    # The tested checkpoint's method state: e.g. how many latents AuxK revived on the way to it.
    metrics.update({f"fit/{k}": v for k, v in module.fit_record().items()})
    if (missed := target_missed(module, metrics)) and trainer.global_rank == 0:
        report(missed, stream=sys.stderr)
    if replay is not None:  # this job's share of the stacked fit its jobs shared, then its replay
        metrics["fit/seconds"] += replay.stacked_seconds / replay.stacked_jobs
        metrics["fit/stacked_seconds"] = replay.stacked_seconds  # the whole group's
        metrics["fit/stacked_jobs"] = replay.stacked_jobs
    return plain_numbers(metrics), trainer.global_rank  # as metrics.json records them


# How far test/l0 may end from target_l0 before the run says so (the issue's and the tests' 5%).
TARGET_L0_TOLERANCE = 0.05


def target_missed(module: SparseAutoencoderModule, metrics: dict[str, Any]) -> str | None:
    """A line saying that the run ended further than TARGET_L0_TOLERANCE from its target_l0 (and
    whether the steered knob ended at its bound: the target out of the method's reach)."""
    target, l0 = module.method.settings.target_l0, metrics.get("test/l0")
    if target is None or not isinstance(l0, float) or abs(l0 / target - 1) <= TARGET_L0_TOLERANCE:
        return None
    bound = getattr(module.method, "reached_bound", lambda: None)()
    why = f": {bound} ended at its bound, the target is out of its reach" if bound else ": train longer"
    return f"note: target_l0={target:g} not reached, test/l0 {l0:.3g} ({l0 / target - 1:+.0%}){why}"


def _test(
    trainer: L.Trainer, module: SparseAutoencoderModule, datamodule: MNISTDataModule, output_dir: Path
) -> dict[str, Any]:
    """The test pass of the best checkpoint (else the last, else the module as trained): its
    metrics, the monitored score and the path tested. SIGTERM during it: recorded, and raised."""
    checkpoint = trainer.checkpoint_callback
    tested = None
    if checkpoint is not None:
        tested = checkpoint.best_model_path or checkpoint.last_model_path or None
    try:
        metrics: dict[str, Any] = run_test(trainer, module, datamodule, ckpt_path=tested)
        if trainer.received_sigterm:  # after the test's last batch (probes, figures) Lightning goes on
            raise SIGTERMException
    except SIGTERMException:  # preempted, scancel: stop as during fit; what the test made is not kept
        said = (
            "stopped by SIGTERM while testing; its training is complete: continue with: "
            f"python train.py resume={output_dir}"
        )
        if trainer.global_rank == 0:
            RunRecord(output_dir).interrupted(said)
        report(said, stream=sys.stderr)
        raise
    if checkpoint is not None and checkpoint.best_model_score is not None:
        metrics[checkpoint.monitor] = float(checkpoint.best_model_score)
    metrics["ckpt_path"] = str(Path(tested).resolve()) if tested else None
    return metrics


def _record(cfg: DictConfig, metrics: dict[str, Any], rank_zero: bool) -> None:
    """The run's record (rank 0 only: under DDP every process has the same, synced, metrics), and
    what it says on the console."""
    output_dir = Path(cfg.output_dir)
    pending = pending_results(output_dir)
    wanted = cfg.optimized_metric
    if wanted and wanted not in metrics and wanted not in pending_results_metrics(pending):
        report(
            f"warning: optimized_metric={cfg.optimized_metric} is not among this run's metrics: a sweeper "
            "(Optuna) gets nothing from it; metrics.json lists the names",
            stream=sys.stderr,
        )
    if not rank_zero:
        return
    # "ok" once every result is on disk: a sweep job's probes and figures may still be coming.
    RunRecord(output_dir).finished(metrics, pending, completing_command(output_dir))
    report(format_metrics(metrics))
    report(closing_lines(output_dir, metrics["ckpt_path"], pending))


def pending_results_metrics(pending: list[str]) -> list[str]:
    """Metric names a run's handed-off results (`pending`) will add (its probes), for the check above."""
    probes = ("test/probe_accuracy", "test/probe_accuracy_pixels", "test/probe_accuracy_reconstructions")
    return list(probes) if "probes" in pending else []


def completing_command(output_dir: Path) -> str:
    """The command that completes a sweep job's results if its sweep stops before they land."""
    from hydra.core.hydra_config import HydraConfig

    sweep = Path(HydraConfig.get().sweep.dir) if HydraConfig.initialized() else output_dir.parent
    return f"python evaluate.py sweep_dir={sweep.resolve()}"


def requeued_by_slurm(output_dir: Path) -> bool:
    """Whether this is a SLURM job run again (requeued after preemption, a node failure, `scontrol
    requeue`) that finds its own last.ckpt: it then resumes instead of starting over in its folder."""
    restarts = os.environ.get("SLURM_RESTART_COUNT", "")
    return restarts.isdigit() and int(restarts) > 0 and last_checkpoint_path(output_dir).is_file()


def use_thread_count(cfg: DictConfig) -> None:
    """Set torch's CPU threads to thread_count(cfg), where that names a count."""
    if threads := thread_count(cfg):
        torch.set_num_threads(threads)


def thread_count(cfg: DictConfig) -> int | None:
    """The torch threads for this run: `threads` when set (e.g. a share of the cores when several
    jobs run at once); inside a SLURM job, the cores of its allocation (SLURM_CPUS_PER_TASK),
    unless OMP_NUM_THREADS says otherwise: torch reads neither SLURM variable, and a cluster that
    does not bind tasks to cores would leave it every core of the node; else torch's default."""
    if cfg.get("threads"):
        return int(cfg.threads)
    cpus = os.environ.get("SLURM_CPUS_PER_TASK", "")
    if cpus.isdigit() and int(cpus) > 0 and "OMP_NUM_THREADS" not in os.environ:
        return int(cpus)
    return None


def build_data_and_module(cfg: DictConfig) -> tuple[MNISTDataModule, SparseAutoencoderModule]:
    """The data module and the model of a training config, seeded first: a run's initial weights
    and batch order depend only on its seed (the vectorized launcher builds its jobs here too).
    Built from the checked settings (sae.config), not by Hydra: a config names no class here."""
    if cfg.get("seed") is not None:
        L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule = MNISTDataModule(**data_settings(cfg))
    module = SparseAutoencoderModule(**model_settings(cfg))
    module.cuda_graph = cfg.get("cuda_graph", True)  # how it runs, not what it trains: no hyperparameter
    return datamodule, module


def build_trainer(cfg: DictConfig, **overrides: Any) -> L.Trainer:
    """A Trainer from cfg.trainer with the configured callbacks and loggers."""
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    if not cfg.trainer.get("enable_progress_bar", True):  # Lightning refuses a bar it was told not to show
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not cfg.trainer.get("max_time"):  # with max_time, Lightning adds a Timer of its own
        callbacks.append(Timer())  # fit/seconds (duration None: it measures, never stops)
    loggers = [instantiate(c) for c in (cfg.get("logger") or {}).values()]
    # The module writes train/* every log_every_n_steps optimizer steps, however many batches each
    # training call holds; Lightning's warning compares that number with the calls per epoch.
    warnings.filterwarnings("ignore", message=r"The number of training batches \(\d+\) is smaller than")
    with srun_hint_silenced(cfg.trainer):
        trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False, **overrides)
    guard_checkpoint_restore(trainer, refuse_restore)
    return trainer


@contextmanager
def srun_hint_silenced(trainer_cfg: DictConfig) -> Iterator[None]:
    """Without Lightning's hint, given on a machine with SLURM installed as the Trainer is built
    and again as fit starts, to start the run with srun: processes of a multi-device run started
    otherwise hang, but a run of one process cannot. Kept for those of several."""
    with warnings.catch_warnings():
        if runs_in_one_process(trainer_cfg):
            warnings.filterwarnings("ignore", message=r"The `srun` command is available on your system")
        yield


def runs_in_one_process(trainer_cfg: DictConfig) -> bool:
    """Whether the trainer runs on one device of one node (no process of its own to start)."""
    devices = trainer_cfg.get("devices", "auto")
    one = devices in (1, "1") or (isinstance(devices, ListConfig | list) and len(devices) == 1)
    return one and trainer_cfg.get("num_nodes", 1) == 1


def fit_timer(trainer: L.Trainer) -> Timer:
    return next(c for c in trainer.callbacks if isinstance(c, Timer))


def run_test(
    trainer: L.Trainer,
    module: L.LightningModule,
    datamodule: L.LightningDataModule,
    ckpt_path: str | None = None,
) -> dict[str, float]:
    """Test metrics (and whatever the callbacks log at test time) as plain floats."""
    results = trainer.test(module, datamodule=datamodule, ckpt_path=ckpt_path, verbose=False)
    axes = ("step", "epoch")  # where the loggers put the metrics, not metrics themselves
    return {k: float(v) for k, v in results[0].items() if k not in axes}
