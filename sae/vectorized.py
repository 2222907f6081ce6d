"""The vectorized launcher: a multirun's jobs that share an architecture train as one stacked model.

`python train.py -m hydra/launcher=vectorized beta=1e-3,5e-3 rho=0.02,0.05 seed=0,1` works in two
phases. First the jobs are grouped by everything but rho, beta, lr and seed, and each group of two
or more trains at once (sae.stacked.StackedTraining), keeping every job's per-step loss terms and,
at each epoch end, its weights and Adam state. Then each job runs through Hydra's `run_job` like
any other: its folder, `.hydra/`, callbacks and the whole `train(cfg)` pipeline, except that the
training epochs are replayed from what the stacked phase recorded (ReplayModule): the loggers get
the same train/* windows, validation, checkpoints (best and last, resumable), TensorBoard views,
the test, figures and metrics.json are produced by the same code as for a separate run, and a job
whose loss went NaN fails at the same step with the same message. Jobs that cannot be stacked
(alone in their group, resumed, limited batches, several devices, an invalid config) run as the
basic launcher runs them.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import torch
from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, open_dict
from torch import Tensor

from sae.config import validate_train_config
from sae.console import one_line, run_command
from sae.lightning_internals import count_optimizer_steps
from sae.module import SparseAutoencoderModule
from sae.stacked import StackedTraining
from sae.training import build_data_and_module, train

log = logging.getLogger(__name__)

# The sweep values a stacked group may differ in (everything else must be the same).
PER_JOB_KEYS = ("rho", "beta", "lr", "seed")
# Trainer settings under which a replayed run is the run it stands for.
STACKABLE_TRAINER_KEYS = {
    "_target_",
    "default_root_dir",
    "max_epochs",
    "log_every_n_steps",
    "deterministic",
    "plugins",
    "accelerator",
    "devices",
    "precision",
    "enable_progress_bar",
    "enable_model_summary",
    "limit_val_batches",
    "limit_test_batches",
    "num_sanity_val_steps",
}


@dataclass
class JobRecord:
    """What the stacked phase leaves for one job: per-epoch (steps, 3) loss terms, and weights and
    Adam state at each epoch end."""

    terms: list[Tensor] = field(default_factory=list)
    weights: list[dict[str, Tensor]] = field(default_factory=list)
    optimizer_states: list[dict] = field(default_factory=list)
    stacked_seconds: float = 0.0
    stacked_jobs: int = 1

    def attach(self, module: SparseAutoencoderModule, datamodule: L.LightningDataModule) -> ReplayModule:
        """The replaying stand-in for `module` (same hyperparameters and initial weights); the data
        module then serves one training item per epoch."""
        replay = ReplayModule(**module.hparams)
        replay.record = self
        replay.load_state_dict(module.state_dict())
        datamodule.train_dataloader = lambda: [0]  # one training call per epoch; validation as usual
        return replay


class ReplayModule(SparseAutoencoderModule):
    """A SparseAutoencoderModule whose training epochs are replayed from a JobRecord.

    Each epoch is one training call: it feeds the epoch's recorded per-step terms through the
    module's own window logging and divergence check (one optimizer step at a time, so the step
    counter, the train/* windows and a NaN's step are those of the run it stands for), then loads
    the epoch-end weights and Adam state. Validation, checkpoints and everything after are the
    module's and Lightning's own.
    """

    record: JobRecord  # set by JobRecord.attach (not a constructor argument: not a hyperparameter)

    def training_step(self, batch, batch_idx: int) -> None:
        epoch = self.current_epoch
        written = None
        for terms in self.record.terms[epoch].to(self.device):
            count_optimizer_steps(self.trainer, 1)  # the optimizer step this row was recorded at
            if (mean_loss := self._after_step(terms)) is not None:
                written = mean_loss
        self._end_call(written)
        self.net.load_state_dict(self.record.weights[epoch])
        self.optimizers().optimizer.load_state_dict(self.record.optimizer_states[epoch])


def stackable(cfg: DictConfig) -> bool:
    """Whether a replayed run of cfg is exactly the run train.py would do."""
    try:
        validate_train_config(cfg)
    except ValueError:
        return False  # it fails on its own, with its own message
    trainer = cfg.trainer
    return (
        not cfg.get("resume")
        and not cfg.get("ckpt_path")
        and set(trainer) <= STACKABLE_TRAINER_KEYS
        and trainer.get("devices", 1) in (1, "1", "auto")
        and str(trainer.get("precision", "32-true")) in ("32", "32-true")
        and cfg.data.val_size > 0  # train.py drops validation without it; kept simple: run alone
    )


def group_key(overrides: list[str]) -> tuple[str, ...]:
    """Jobs whose overrides differ only in PER_JOB_KEYS share every other config value."""
    return tuple(sorted(o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in PER_JOB_KEYS))


def stacked_device(cfg: DictConfig) -> torch.device:
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    use_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    return torch.device("cuda" if use_gpu else "cpu")


def train_group(cfgs: list[DictConfig]) -> list[JobRecord]:
    """Train the jobs of one group as one stacked model; their records, in order."""
    start = time.perf_counter()
    built = [build_data_and_module(cfg) for cfg in cfgs]  # as train(cfg) builds them
    datamodule = built[0][0]
    stacked = StackedTraining([m for _, m in built], stacked_device(cfgs[0]))
    records = [JobRecord(stacked_jobs=len(cfgs)) for _ in cfgs]
    seeds = [cfg.seed for cfg in cfgs]
    images = datamodule.split("train")[0]
    for epoch, terms in stacked.fit(images, cfgs[0].batch_size, seeds, cfgs[0].epochs):
        terms = terms.cpu()
        for j, record in enumerate(records):
            weights, optimizer_state = stacked.job_state(j)
            record.terms.append(terms[:, j])
            record.weights.append(weights)
            record.optimizer_states.append(optimizer_state)
        seconds = time.perf_counter() - start
        log.info(f"stacked {len(cfgs)} jobs: epoch {epoch + 1}/{cfgs[0].epochs} ({seconds:.1f} s)")
    for record in records:
        record.stacked_seconds = time.perf_counter() - start
    return records


def launch(
    hydra_context: HydraContext,
    task_function: TaskFunction,
    config: DictConfig,
    job_overrides,
    initial_job_idx: int,
) -> list[JobReturn]:
    """hydra/launcher=vectorized: stack what can be stacked, then run every job through run_job."""
    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    jobs = []
    for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
        cfg = hydra_context.config_loader.load_sweep_config(config, list(overrides))
        with open_dict(cfg):
            cfg.hydra.job.id = cfg.hydra.job.num = idx
        jobs.append((idx, list(overrides), cfg))

    groups: dict[tuple[str, ...], list[int]] = {}
    for i, (_, overrides, cfg) in enumerate(jobs):
        if stackable(cfg):
            groups.setdefault(group_key(overrides), []).append(i)
    records: dict[int, JobRecord] = {}
    for members in groups.values():
        if len(members) > 1:
            names = ", ".join(str(jobs[i][0]) for i in members)
            log.info(f"training jobs {names} as one stacked model")
            try:
                group_records = train_group([jobs[i][2] for i in members])
            except Exception as err:  # e.g. missing data: each job then fails with its own message
                log.warning(f"stacked training of jobs {names} failed ({one_line(err)}); one job at a time")
                continue
            records.update(zip(members, group_records, strict=True))

    returns = []
    for i, (idx, overrides, cfg) in enumerate(jobs):
        mode = "replayed from the stacked model" if i in records else "alone"
        log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))} ({mode})")
        task = task_function
        if i in records:

            def task(job_cfg: DictConfig, record: JobRecord = records[i]):
                # As train.py's main: errors for Hydra to record, SIGTERM ends the sweep with 143.
                metrics = run_command(lambda: train(job_cfg, replay=record))
                return metrics.get(job_cfg.optimized_metric)

        returns.append(
            run_job(
                hydra_context=hydra_context,
                task_function=task,
                config=cfg,
                job_dir_key="hydra.sweep.dir",
                job_subdir_key="hydra.sweep.subdir",
            )
        )
        configure_log(config.hydra.hydra_logging, config.hydra.verbose)  # run_job set the job's
    return returns
