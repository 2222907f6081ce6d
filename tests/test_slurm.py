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

from sae.sweep import job_row
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

# The recipe on a CPU-only partition (the local cluster's): one core and a little memory per job.
ON_THE_CLUSTER = [
    "launcher=submitit_slurm_cpu",
    "hydra.launcher.partition=debug",
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


def test_a_failing_job_is_marked_failed_and_the_other_finishes(mnist_root, tmp_path):
    sweep = tmp_path / "sweep"
    proc = slurm_sweep(mnist_root, sweep, "epochs=1", "beta=5e-3,-1")
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode != 0, output[-3000:]  # the command says a job failed
    assert "1 of 2 jobs failed or did not finish (jobs 1)" in output, output[-3000:]
    rows = summary_rows(sweep)
    assert [(r["beta"], r["status"]) for r in rows] == [("0.005", "ok"), ("-1", "failed")]
    assert "beta=-1 must be a number" in rows[1]["error"]
    assert float(rows[0]["test/mse"]) > 0


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
    raw_id = subprocess.run(["squeue", "-h", "-o", "%A", "-j", job_id], capture_output=True, text=True).stdout
    listed = subprocess.run(
        ["scontrol", "listpids", raw_id.strip()], capture_output=True, text=True, check=True
    )
    pids = [int(line.split()[0]) for line in listed.stdout.splitlines()[1:] if line.split()[2] == "0"]
    assert pids, listed.stdout  # step 0: srun's task, the python process of the job
    for pid in pids:
        os.kill(pid, signal.SIGKILL)


def test_scancel_leaves_last_ckpt_to_resume_and_a_killed_job_is_marked_failed(mnist_root, tmp_path):
    """What preemption sends (SIGTERM, scancel) and what a kill for memory does (SIGKILL), a job each.

    Both jobs would train for long; each is stopped once it has written its first last.ckpt. The
    sweep must end by itself (submitit learns the killed job's end from sacct), with both jobs
    in its summary, and the SIGTERM'd one must finish with resume=.
    """
    sweep = tmp_path / "sweep"
    proc = slurm_sweep(mnist_root, sweep, "epochs=2000", "seed=0,1")
    try:  # one after the other: on a one-core node the second job starts when the first ends
        wait_for(lambda: (sweep / "0" / "checkpoints" / "last.ckpt").is_file(), 300, "job 0's last.ckpt")
        subprocess.run(["scancel", array_job_ids(sweep)[0]], check=True)  # SIGTERM, SIGKILL after KillWait
        wait_for(lambda: (sweep / "1" / "checkpoints" / "last.ckpt").is_file(), 300, "job 1's last.ckpt")
        kill_training(array_job_ids(sweep)[1])
        output, _ = proc.communicate(timeout=300)
    finally:  # a failure above must not leave the sweep or its jobs running
        proc.kill()
        for job_id in array_job_ids(sweep).values():
            subprocess.run(["scancel", job_id], capture_output=True)
    assert proc.returncode != 0
    assert "2 of 2 jobs failed or did not finish" in output, output[-3000:]
    assert "Bypassing sacct error" not in output  # the cluster keeps accounting: no warning per poll
    rows = {r["job"]: r for r in summary_rows(sweep)}
    assert rows["0"]["status"] == "interrupted", rows["0"]
    assert f"continue with: python train.py resume={sweep / '0'}" in rows["0"]["error"]
    assert rows["1"]["status"] == "failed", rows["1"]
    assert f"slurm job {array_job_ids(sweep)[1]} ended without a result (state FAILED)" in rows["1"]["error"]

    # resume= finishes the interrupted job where it stopped (one more epoch, here, outside SLURM)
    stopped = torch.load(sweep / "0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    epochs = stopped["epoch"] + 1
    resumed = subprocess.run(
        train_command(mnist_root, f"resume={sweep / '0'}", f"epochs={epochs}"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert metrics["resumed_from"] == str((sweep / "0" / "checkpoints" / "last.ckpt").resolve())
    assert job_row(sweep / "0")["status"] == "ok"


def raw_job_id(job_id: str) -> str:
    """The plain SLURM id of an array task (<array>_<index>), as scontrol wants it."""
    listed = subprocess.run(["squeue", "-h", "-o", "%A", "-j", job_id], capture_output=True, text=True)
    assert listed.stdout.strip(), f"{job_id} is not in the queue: {listed.stderr}"
    return listed.stdout.strip()


def test_a_requeued_job_continues_from_its_last_ckpt(mnist_root, tmp_path):
    """Preemption with requeue (or a node failure) runs the job again: it resumes, it does not
    start over, and the sweep ends as if nothing happened."""
    sweep = tmp_path / "sweep"
    proc = slurm_sweep(mnist_root, sweep, "epochs=40", "seed=0")
    try:
        wait_for(lambda: (sweep / "0" / "checkpoints" / "last.ckpt").is_file(), 300, "the job's last.ckpt")
        job_id = raw_job_id(array_job_ids(sweep)[0])
        subprocess.run(["scontrol", "requeue", job_id], check=True)  # SIGTERM, then back in the queue
        wait_for(
            lambda: (
                "PENDING"
                in subprocess.run(
                    ["squeue", "-h", "-o", "%T", "-j", job_id], capture_output=True, text=True
                ).stdout
            ),
            60,
            "the requeued job to be pending",
        )
        subprocess.run(
            ["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True
        )  # no 2-min wait
        output, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
        for array_task in array_job_ids(sweep).values():
            subprocess.run(["scancel", array_task], capture_output=True)
    assert proc.returncode == 0, output[-3000:]
    [row] = summary_rows(sweep)
    assert row["status"] == "ok"
    metrics = json.loads((sweep / "0" / "metrics.json").read_text())
    assert metrics["resumed_from"] == str((sweep / "0" / "checkpoints" / "last.ckpt").resolve())
    log = "".join(p.read_text() for p in (sweep / ".submitit").glob("*/*_log.*"))
    assert "interrupted at step" in log and "SLURM restarted this job" in log, log[-3000:]
    last = torch.load(sweep / "0" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    assert last["epoch"] == 39  # its 40th epoch (counted from 0): all of them, in two runs
