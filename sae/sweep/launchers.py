"""Hydra's submitit launchers (SLURM, local), with a sweep that outlives a job that died.

Hydra's versions wait for each job's result and raise at the first job that left none: a job
cancelled (`scancel`, preemption), killed for memory or time, or lost with its node ends the
whole sweep with a traceback, and no summary is written. These record such a job as failed (or
keep its own "interrupted" status, when it saved last.ckpt on SIGTERM), say so in one line, and
let the sweep finish: its summary lists the job, and the command exits non-zero naming it.

The submission is Hydra's, unchanged (hydra-submitit-launcher 1.2's `launch`, up to the jobs'
results). Hydra accepts launchers only from the hydra_plugins namespace: the classes the configs
name are in hydra_plugins/sae_submitit_launchers.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus, filter_overrides
from hydra_plugins.hydra_submitit_launcher import submitit_launcher as hydra_submitit
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf, open_dict

from sae.errors import JobFailed, one_line
from sae.internals import failed_job_error, submitit_cluster
from sae.names import register_resolvers
from sae.run.console import report
from sae.run.record import RunRecord


class SweepOutlivesJobs(hydra_submitit.BaseSubmititLauncher):
    """launch() as Hydra's, but a job that left no result becomes a JobReturn holding JobFailed."""

    @property
    def cluster(self) -> str:
        """submitit's executor kind: "local" or "slurm"."""
        return submitit_cluster(self)

    def __call__(self, *args: Any, **kwargs: Any) -> JobReturn:
        """The job, in its own process (submitit's): the config resolvers train.py registers
        (sae.cli.start_process) are registered there too; the thread environment is inherited."""
        register_resolvers()
        return super().__call__(*args, **kwargs)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        jobs = self._submit(job_overrides, initial_job_idx)
        return [
            self._outcome(job, list(overrides), initial_job_idx + i)
            for i, (job, overrides) in enumerate(zip(jobs, job_overrides, strict=True))
        ]

    def _submit(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Any]:
        """Hydra's submission: one executor, the job parameters, one array of jobs."""
        import submitit

        assert self.config is not None and job_overrides
        specific_init_keys = {"max_num_timeout"}
        init_params = {"folder": self.params["submitit_folder"]}
        init_params |= {f"{self.cluster}_{k}": v for k, v in self.params.items() if k in specific_init_keys}
        executor = submitit.AutoExecutor(cluster=self.cluster, **init_params)
        base_keys = set(OmegaConf.structured(BaseQueueConf).keys())
        skipped = specific_init_keys | {"submitit_folder"}
        params = {k: v for k, v in self.params.items() if k not in skipped}
        executor.update_parameters(
            **{k if k in base_keys else f"{self.cluster}_{k}": v for k, v in params.items()}
        )
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        hydra_submitit.log.info(f"Submitit '{self.cluster}' sweep output dir : {sweep_dir}")
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if "mode" in self.config.hydra.sweep:
            os.chmod(sweep_dir, mode=int(str(self.config.hydra.sweep.mode), 8))
        job_params = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            hydra_submitit.log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            job_params.append(
                (list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state())
            )
        try:
            return executor.map_array(self, *zip(*job_params, strict=True))
        except submitit.core.utils.FailedJobError as err:  # e.g. sbatch refused what the jobs ask for
            sys.exit(f"error: {self._refused(err)}")

    def _refused(self, err: BaseException) -> str:
        """One line for a submission the scheduler refused: its reason, what was asked, the fix."""
        asked = ", ".join(
            f"{key}={self.params[key]}"
            for key in ("partition", "gpus_per_node", "cpus_per_task", "mem_gb", "timeout_min")
            if key in self.params
        )
        return (
            f"{self.cluster} refused the sweep's jobs ({_last_line(err)}); each asked for {asked}: "
            "on a CPU-only partition use launcher=submitit_slurm_cpu, else change hydra.launcher.<key>"
        )

    def _outcome(self, job: Any, overrides: list[str], job_num: int) -> JobReturn:
        """The job's JobReturn; for a job that left none, or that submitit ended from within (out of
        time, not requeued), a completed one holding JobFailed, so that the sweep goes on."""
        from submitit.core.utils import FailedJobError, UncompletedJobError

        try:
            outcome = job.results()[0]
        except (UncompletedJobError, FailedJobError) as err:
            line = self._dead_job_line(job, err, self._job_folder(overrides, job_num))
        else:
            error = failed_job_error(outcome) if outcome.status == JobStatus.FAILED else None
            if not isinstance(error, UncompletedJobError):
                return outcome  # finished, or failed with an error of ours (Hydra re-raises it at the end)
            line = one_line(error)  # the job recorded its failed status itself
        shown = " ".join(filter_overrides(overrides))
        report(f"job {job_num} ({shown}) did not finish: {line}")
        outcome = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
        outcome.return_value = JobFailed(line)
        return outcome

    def _dead_job_line(self, job: Any, err: BaseException, folder: Path) -> str:
        """What the summary says of a job that left no result, recorded in its folder's status.json."""
        from submitit.core.utils import FailedJobError

        status = RunRecord(folder).status()
        if status.get("status") == "interrupted":  # it saved last.ckpt and said how to resume
            return status.get("error", "interrupted")
        line = f"{self.cluster} job {job.job_id} ended without a result (state {job.state})"
        if isinstance(err, FailedJobError):  # submitit's own error: its traceback's last line
            line += f": {_last_line(err)}"
        line += f"; its log: {job.paths.stderr}"
        if folder.is_dir():
            RunRecord(folder).failed(line)
        return line

    def _job_folder(self, overrides: list[str], job_num: int) -> Path:
        """The folder Hydra gives the job (hydra.sweep.dir/hydra.sweep.subdir), as the job does."""
        assert self.hydra_context is not None and self.config is not None
        config = self.hydra_context.config_loader.load_sweep_config(self.config, overrides)
        with open_dict(config.hydra.job):
            config.hydra.job.num = job_num
        return Path(str(config.hydra.sweep.dir)) / str(config.hydra.sweep.subdir)


def _last_line(err: BaseException) -> str:
    """submitit's error holds the job's whole traceback; its last line says what happened."""
    lines = [line for line in str(err).splitlines() if line.strip()]
    return one_line(RuntimeError(lines[-1] if lines else type(err).__name__))
