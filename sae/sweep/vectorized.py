"""The vectorized launcher: a multirun's jobs that share an architecture train as one stacked model.

`python train.py -m hydra/launcher=vectorized beta=1e-3,5e-3 rho=0.02,0.05 seed=0,1` works in two
phases. First the jobs are grouped by their composed configs: everything but rho, beta, lr and seed
(so the method, k and the architecture) must be the same. Each group of two or more trains at once
(sae.sweep.stacked.train_group), keeping every job's per-step loss terms and, at each epoch end, its
weights and Adam state. Then each job runs through Hydra's `run_job` like any
other: its folder, `.hydra/`, callbacks and the whole `train(cfg)` pipeline, except that the
training epochs are replayed from what the stacked phase recorded (sae.sweep.stacked.ReplayModule): the
loggers get the same train/* windows, validation, checkpoints (best and last, resumable),
TensorBoard views, the test, figures and metrics.json are produced by the same code as for a
separate run, and a job whose loss went NaN fails at the same step with the same message. Jobs that
cannot be stacked (alone in their group, resumed, limited batches, several devices, a method that
keeps state of its own such as TopK's AuxK, an invalid config, another application's config) run
as Hydra's basic launcher runs them.

This module imports neither torch nor Lightning: an application that has nothing to stack pays
for neither.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from hydra.core.utils import JobReturn, configure_log, filter_overrides, run_job, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict

from sae.errors import JobFailed, one_line
from sae.run.commands import run_command

if TYPE_CHECKING:
    from sae.sweep.stacked import JobRecord

log = logging.getLogger(__name__)

# Only this project's model can be stacked.
MODULE_TARGET = "sae.training.module.SparseAutoencoderModule"
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
    "gradient_clip_val",  # refused by the config check unless off
    "accumulate_grad_batches",
    "limit_val_batches",
    "limit_test_batches",
    "num_sanity_val_steps",
}


def stackable(cfg: DictConfig) -> bool:
    """Whether a replayed run of cfg is exactly the run train.py would do."""
    if OmegaConf.select(cfg, "model._target_", default=None) != MODULE_TARGET:
        return False  # another application's config
    from sae.config import validate_train_config
    from sae.core.sparsity import METHODS

    try:
        validate_train_config(cfg)
    except Exception:  # an invalid config: the job runs (and fails) alone, with its own message
        return False
    trainer = cfg.trainer
    return (
        not cfg.get("resume")
        and not cfg.get("ckpt_path")
        and set(trainer) <= STACKABLE_TRAINER_KEYS
        and trainer.get("devices", 1) in (1, "1", "auto")
        and str(trainer.get("precision", "32-true")) in ("32", "32-true")
        and cfg.data.val_size > 0  # train.py drops validation without it; kept simple: run alone
        and METHODS[cfg.model.sparsity.method].stacks(cfg.model.sparsity)
    )


def group_key(cfg: DictConfig) -> str:
    """Jobs whose composed configs are the same but for PER_JOB_KEYS share one key.

    The composed config, not the command line: jobs of different presets (`+point=...`) that set
    the same method and architecture stack, and an override that changes nothing splits nothing.
    Interpolations stay unresolved (`${output_dir}` is the same text in every job).
    """
    plain = OmegaConf.to_container(cfg, resolve=False)
    for key in ("hydra", *PER_JOB_KEYS):
        plain.pop(key, None)
    return json.dumps(plain, sort_keys=True, default=str)


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

    groups: dict[str, list[int]] = {}
    for i, (_, _, cfg) in enumerate(jobs):
        if stackable(cfg):
            groups.setdefault(group_key(cfg), []).append(i)
    records: dict[int, JobRecord] = {}  # sae.sweep.stacked.JobRecord
    for members in groups.values():
        if len(members) > 1:
            names = ", ".join(str(jobs[i][0]) for i in members)
            log.info(f"training jobs {names} as one stacked model")
            from sae.sweep.stacked import train_group

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
            from sae.training.fit import train

            def task(job_cfg: DictConfig, record: JobRecord = records[i]):
                # As train.py's main: errors for Hydra to record, SIGTERM ends the sweep with 143.
                metrics = run_command(lambda: train(job_cfg, replay=record))
                return metrics if isinstance(metrics, JobFailed) else metrics.get(job_cfg.optimized_metric)

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
