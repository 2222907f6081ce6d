"""The README's SLURM recipes (launcher=submitit_slurm, submitit_slurm_cpu) against a real cluster.

`.ci/slurm-local up` starts a one-node cluster with accounting on this machine (CI does); where
none answers (`sinfo`), these tests are skipped, saying so. Each job is a SLURM job of the array
that submitit submits, on the synthetic data, with one core and no GPU (a CPU partition). What a
cluster does to jobs is done for real: scancel (SIGTERM, as preemption), scontrol requeue, and a
SIGKILL of the training process (as the OOM killer).
"""

import csv
import json
import os
import signal
import subprocess
import time

import pytest
import torch

from sae.report.summary import job_row
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

# What a job writes after training (probe, figures) is the same on any launcher (tested with the
# basic one); left out where a test is about what the cluster does to the job.
NO_RUN_VISUALS = ["~callbacks.linear_probe", "~callbacks.run_figures", "~callbacks.epoch_visuals"]
# The recipe on a CPU-only partition (the local cluster's): one core and a little memory per job.
ON_THE_CLUSTER = [
    "launcher=submitit_slurm_cpu",
    "hydra.launcher.partition=debug",
    "hydra.launcher.cpus_per_task=1",
    "hydra.launcher.mem_gb=2",
    "hydra.launcher.timeout_min=10",
]


def test_a_sweep_runs_as_slurm_jobs_and_a_failing_job_leaves_the_others_to_finish(mnist_root, tmp_path):
    sweep = tmp_path / "sweep"
    command = train_command(mnist_root, "epochs=1", f"hydra.sweep.dir={sweep}", *ON_THE_CLUSTER)
    command += ["beta=1e-3,5e-3,-1", "-m"]  # the third job's value is invalid
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0, proc.stdout[-3000:] + proc.stderr[-3000:]  # it says a job failed
    assert "1 of 3 jobs failed or did not finish (jobs 2)" in proc.stderr, proc.stderr[-3000:]
    rows = summary_rows(sweep)
    assert [(r["beta"], r["status"]) for r in rows] == [("1e-3", "ok"), ("5e-3", "ok"), ("-1", "failed")]
    assert "beta=-1 must be a number" in rows[2]["error"]
    assert all(float(r["test/mse"]) > 0 and 0 < float(r["test/probe_accuracy"]) <= 1 for r in rows[:2])
    assert int(rows[0]["fit/threads"]) == 1  # the job's allocation: cpus_per_task cores
    for job in ("0", "1"):
        assert (sweep / job / "checkpoints" / "last.ckpt").is_file()
        assert (sweep / job / "plots" / "unit_means.png").is_file()
    # submitit's folder of the array: each job's SLURM output, written by the job on its node
    logs = list((sweep / ".submitit").glob("*/*_log.out"))
    assert len(logs) == 3, sorted(p.name for p in (sweep / ".submitit").rglob("*"))
    assert sum("run folder:" in log.read_text() for log in logs) == 2
    job_output = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.*"))
    assert "Traceback" not in job_output and "srun` command is available" not in job_output
    assert "srun` command is available" not in proc.stdout + proc.stderr  # nor on the login node
    assert (sweep / "summary.md").is_file() and (sweep / "pareto.png").is_file()


def test_the_gpu_preset_on_a_cpu_partition_is_refused_in_one_line(mnist_root, tmp_path):
    sweep = tmp_path / "sweep"
    command = train_command(mnist_root, f"hydra.sweep.dir={sweep}", "launcher=submitit_slurm")
    command += ["hydra.launcher.partition=debug", "beta=1e-3,5e-3", "-m"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: slurm refused the sweep's jobs (sbatch: error: "), last
    assert "gpus_per_node=1" in last and "use launcher=submitit_slurm_cpu" in last
    assert not list(sweep.glob("[0-9]*"))  # no job ran


def slurm_sweep(mnist_root, sweep, *overrides: str) -> subprocess.Popen:
    """`python train.py ... -m` on the cluster, started (not waited for)."""
    command = train_command(mnist_root, f"hydra.sweep.dir={sweep}", *ON_THE_CLUSTER, *overrides, "-m")
    return subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def summary_rows(sweep) -> list[dict[str, str]]:
    with open(sweep / "summary.csv") as f:
        return list(csv.DictReader(f))


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"waited {timeout:.0f} s for {what}"
        time.sleep(0.5)


def array_job_ids(sweep) -> dict[int, str]:
    """job number -> SLURM id of the sweep's running or finished jobs (<array>_<index>, or a plain id
    for a one-job sweep), read off submitit's folders that hold a job's log."""
    ids = {}
    for log in (sweep / ".submitit").glob("*/*_log.out"):
        job_id = log.parent.name
        ids[int(job_id.partition("_")[2] or 0)] = job_id
    return ids


def kill_training(job_id: str) -> None:
    """SIGKILL the job's training process, as the kernel's OOM killer would (`scancel --signal=KILL`
    would not do: SLURM treats it as a cancel, SIGTERM first)."""
    listed = subprocess.run(
        ["scontrol", "listpids", raw_job_id(job_id)], capture_output=True, text=True, check=True
    )
    pids = [int(line.split()[0]) for line in listed.stdout.splitlines()[1:] if line.split()[2] == "0"]
    assert pids, listed.stdout  # step 0: srun's task, the python process of the job
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def test_scancel_kill_and_requeue_each_end_as_a_cluster_user_expects(mnist_root, tmp_path):
    """What a cluster does to jobs, one job each: scancel (SIGTERM, as preemption), a SIGKILL of the
    training process (as the kernel's OOM killer), and scontrol requeue (preemption with requeue,
    a failed node).

    Jobs 0 and 1 would train for long, and each is stopped once it has written its first
    last.ckpt; job 2 starts when a core frees and is requeued once it has one. The sweep must end
    by itself (submitit learns the killed jobs' end from sacct) with all three in its summary:
    job 0 interrupted (and resume= finishes it), job 1 failed, job 2 resumed by itself and ok.
    """
    sweep = tmp_path / "sweep"
    last_ckpt = {job: sweep / str(job) / "checkpoints" / "last.ckpt" for job in (0, 1, 2)}
    proc = slurm_sweep(mnist_root, sweep, *NO_RUN_VISUALS, "epochs=2000,2001,30")
    try:  # one after the other: on a one-core node each job starts when the one before ends
        wait_for(last_ckpt[0].is_file, 300, "job 0's last.ckpt")
        subprocess.run(["scancel", array_job_ids(sweep)[0]], check=True)  # SIGTERM, SIGKILL after KillWait
        wait_for(last_ckpt[1].is_file, 300, "job 1's last.ckpt")
        kill_training(array_job_ids(sweep)[1])
        wait_for(last_ckpt[2].is_file, 300, "job 2's last.ckpt")
        requeue(array_job_ids(sweep)[2])
        output, _ = proc.communicate(timeout=300)
    finally:  # a failure above must not leave the sweep or its jobs running
        proc.kill()
        for job_id in array_job_ids(sweep).values():
            subprocess.run(["scancel", job_id], capture_output=True)
    assert proc.returncode != 0
    assert "2 of 3 jobs failed or did not finish (jobs 0, 1)" in output, output[-3000:]
    assert "Bypassing sacct error" not in output  # the cluster keeps accounting: no warning per poll
    rows = {r["job"]: r for r in summary_rows(sweep)}
    assert rows["0"]["status"] == "interrupted", rows["0"]
    assert f"continue with: python train.py resume={sweep / '0'}" in rows["0"]["error"]
    assert rows["1"]["status"] == "failed", rows["1"]
    assert f"slurm job {array_job_ids(sweep)[1]} ended without a result (state FAILED)" in rows["1"]["error"]

    # the requeued job resumed by itself and finished all its epochs
    assert rows["2"]["status"] == "ok", rows["2"]
    assert rows["2"]["resumed_from"] == str(last_ckpt[2].resolve())
    job_2_log = "".join(
        p.read_text() for p in (sweep / ".submitit" / array_job_ids(sweep)[2]).glob("*_log.*")
    )
    assert "interrupted at step" in job_2_log and "SLURM restarted this job" in job_2_log, job_2_log[-3000:]
    assert torch.load(last_ckpt[2], map_location="cpu", weights_only=True)["epoch"] == 29  # its 30th epoch

    # resume= finishes the interrupted job where it stopped (one more epoch, here, outside SLURM)
    stopped = torch.load(last_ckpt[0], map_location="cpu", weights_only=True)
    resumed = subprocess.run(
        train_command(mnist_root, *NO_RUN_VISUALS, f"resume={sweep / '0'}", f"epochs={stopped['epoch'] + 1}"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert metrics["resumed_from"] == str(last_ckpt[0].resolve())
    assert job_row(sweep / "0")["status"] == "ok"


def requeue(job_id: str) -> None:
    """scontrol requeue, then let it start again at once (SLURM holds a requeued job for 2 minutes).

    job_id as <array>_<index>: the last task's plain id is the array's, which would requeue them all."""
    subprocess.run(["scontrol", "requeue", job_id], check=True)  # SIGTERM, then back in the queue

    def pending() -> bool:
        state = subprocess.run(["squeue", "-h", "-o", "%T", "-j", job_id], capture_output=True, text=True)
        return "PENDING" in state.stdout

    wait_for(pending, 60, f"job {job_id} to be back in the queue")
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)


def raw_job_id(job_id: str) -> str:
    """The plain SLURM id of an array task (<array>_<index>), as scontrol wants it."""
    listed = subprocess.run(["squeue", "-h", "-o", "%A", "-j", job_id], capture_output=True, text=True)
    assert listed.stdout.strip(), f"{job_id} is not in the queue: {listed.stderr}"
    return listed.stdout.strip()
