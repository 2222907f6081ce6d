"""The Hydra callback that keeps a sweep's summary current: each job's status.json as it ends,
the summary after every job and at the sweep's end (after the hand-offs are collected)."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Any

from hydra.core.utils import JobReturn, JobStatus
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from sae.errors import JobFailed, one_line
from sae.report.summary import JobFiles, write_summary
from sae.run import handoff
from sae.run.console import report
from sae.run.record import RunRecord


def _job_exception(job_return: JobReturn) -> BaseException:
    """The exception a failed job raised: JobReturn.return_value re-raises it (and writes a line to
    stderr that the sweep's own report already gives, hence the redirect)."""
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            job_return.return_value  # noqa: B018
    except Exception as err:
        return err
    return RuntimeError("the job failed")


class SweepSummaryCallback(Callback):
    """Hydra callback: records a failed job's status and keeps the sweep summary current."""

    def __init__(self) -> None:
        self.files = JobFiles()  # the jobs' .hydra files as parsed, kept across the sweep's summaries

    def on_job_end(self, config: DictConfig, job_return: JobReturn, **kwargs: Any) -> None:
        output_dir = Path(config.hydra.runtime.output_dir)
        if job_return.status == JobStatus.FAILED:
            RunRecord(output_dir).failed(one_line(_job_exception(job_return)))
        elif isinstance(job_return.return_value, JobFailed):
            RunRecord(output_dir).failed(job_return.return_value.error)
        # a job that finished has recorded "ok" itself (train(), in the folder it trained in)
        if config.hydra.mode is not None and str(config.hydra.mode) == "RunMode.MULTIRUN":
            # Also after each job: a sweep that stops part-way still leaves a summary. Where more
            # jobs follow in this process, its figures wait for the sweep's end (or evaluate.py on
            # the sweep's folder): drawing them after every job would cost each job seconds.
            handoff.collect_finished()  # earlier jobs' probe accuracies, fitted beside the jobs after them
            write_summary(config.hydra.sweep.dir, figures=not handoff.more_jobs_follow(), files=self.files)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        handoff.wait_for_hand_offs()  # the last jobs' figures and probes, done while later jobs trained
        summary = write_summary(config.hydra.sweep.dir, files=self.files)
        report(summary.closing_lines())
        rows = summary.rows
        failed = [r["job"] for r in rows if r["status"] != "ok"]
        if failed:  # the failures' lines were printed as they happened; the command exits non-zero
            sys.exit(
                f"{len(failed)} of {len(rows)} jobs failed or did not finish (jobs {', '.join(failed)}): "
                f"see {Path(config.hydra.sweep.dir) / 'summary.md'}"
            )
