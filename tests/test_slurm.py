"""The README's SLURM recipe (launcher=submitit_slurm) against a real SLURM cluster.

`.ci/slurm-local up` starts a one-node cluster on this machine (CI does); where none answers
(`sinfo`), these tests are skipped, saying so. Each job is a SLURM job of the array that submitit
submits, on the synthetic data, with one core and no GPU (a CPU partition).
"""

import csv
import subprocess

import pytest

from tests.conftest import ROOT, train_command


def cluster_answers() -> bool:
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not cluster_answers(), reason="no SLURM cluster answers here (start one with: .ci/slurm-local up)"
    ),
]

# The recipe on a CPU-only partition: one core, no GPU, a little memory per job.
ON_THE_CLUSTER = [
    "launcher=submitit_slurm",
    "hydra.launcher.partition=debug",
    "hydra.launcher.gpus_per_node=0",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.timeout_min=10",
]


def test_a_two_job_sweep_runs_as_slurm_jobs_and_ends_with_its_summary(mnist_root, tmp_path):
    sweep = tmp_path / "sweep"
    command = train_command(mnist_root, "epochs=1", f"hydra.sweep.dir={sweep}", *ON_THE_CLUSTER)
    command += ["beta=1e-3,5e-3", "-m"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(sweep / "summary.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["beta"], r["status"]) for r in rows] == [("0.001", "ok"), ("0.005", "ok")]
    assert all(float(r["test/mse"]) > 0 and 0 < float(r["test/probe_accuracy"]) <= 1 for r in rows)
    assert int(rows[0]["fit/threads"]) == 1  # the job's allocation: cpus_per_task cores
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        assert (sweep / job / "plots" / "unit_means.png").is_file()
    # submitit's folder of the array: each job's SLURM output, written by the job on its node
    logs = list((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 2, sorted(p.name for p in (sweep / ".submitit").rglob("*"))
    assert all("run folder:" in log.read_text() for log in logs)
    assert (sweep / "summary.md").is_file() and (sweep / "pareto.png").is_file()
