"""A run's status.json says "ok" only once every result it promises is on disk: a sweep job whose
probes and figures are still being computed (or were lost with a killed worker or sweep) says
"incomplete" and what is missing, a killed worker loses nothing, evaluate.py completes what a
stopped sweep left, and SIGTERM while testing stops the sweep as during fit."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
from lightning.pytorch.utilities.exceptions import SIGTERMException

from sae.run import handoff
from sae.run.record import RunRecord
from sae.training.fit import train
from tests.conftest import LEAN, ROOT, compose_train, read_metrics, train_command
from tests.test_handoff import square, wait_for_file

PROBES = ("test/probe_accuracy", "test/probe_accuracy_pixels", "test/probe_accuracy_reconstructions")
FIGURES = {
    "class_heatmap.png",
    "code_heatmap.png",
    "decoder_images.png",
    "encoder_filters.png",
    "feature_density.png",
    "latent_histogram.png",
    "reconstructions.png",
    "unit_means.png",
    "unit_patterns.png",
}


def test_a_run_is_incomplete_until_its_handed_off_results_are_recorded(tmp_path, monkeypatch):
    monkeypatch.setattr(handoff, "more_jobs_follow", lambda: True)
    recorded = []
    handoff.run_or_hand_off("probes", square, 3.0, then=recorded.append, result_of=(tmp_path, "probes"))
    handoff.run_or_hand_off("figures", square, 4.0, result_of=(tmp_path, "figures"))
    assert handoff.pending_results(tmp_path) == ["probes", "figures"]
    RunRecord(tmp_path).finished({}, handoff.pending_results(tmp_path), "python evaluate.py sweep_dir=S")
    status = RunRecord(tmp_path).status()
    assert status["status"] == "incomplete" and status["missing"] == ["probes", "figures"]
    assert status["error"].startswith("probes, figures not yet on disk")
    assert status["error"].endswith("complete them with: python evaluate.py sweep_dir=S")
    handoff.wait_for_hand_offs()
    assert recorded == [9.0] and RunRecord(tmp_path).status() == {"status": "ok", "error": ""}


def test_a_result_that_fails_keeps_the_run_incomplete_saying_how_to_complete_it(tmp_path):
    RunRecord(tmp_path).finished({}, ["probes", "figures"], "python evaluate.py sweep_dir=S")
    RunRecord(tmp_path).result_done("figures")
    assert RunRecord(tmp_path).status()["missing"] == ["probes"]
    RunRecord(tmp_path).result_done("probes", error="disk full")
    status = RunRecord(tmp_path).status()
    assert status["status"] == "incomplete" and status["missing"] == ["probes"]
    assert (
        status["error"] == "probes failed (disk full); complete probes with: python evaluate.py sweep_dir=S"
    )
    (tmp_path / "status.json").write_text(json.dumps({"status": "interrupted", "error": "SIGTERM"}))
    RunRecord(tmp_path).result_done("probes")  # an interrupted run stays interrupted
    assert RunRecord(tmp_path).status()["status"] == "interrupted"


def test_work_of_a_worker_killed_while_busy_is_done_here(tmp_path, monkeypatch, capsys):
    """SIGKILL of the worker (as the kernel's OOM killer sends it) mid-work: the work is done again
    in this process when collected, its result recorded, and the run becomes ok."""
    monkeypatch.setattr(handoff, "more_jobs_follow", lambda: True)
    gate = tmp_path / "gate"
    recorded = []
    handoff.run_or_hand_off(
        "probes", wait_for_file, str(gate), then=recorded.append, result_of=(tmp_path, "probes")
    )
    RunRecord(tmp_path).finished({}, handoff.pending_results(tmp_path), "cmd")
    deadline = time.monotonic() + 120
    while not handoff._worker._processes and time.monotonic() < deadline:
        time.sleep(0.02)
    (pid,) = handoff._worker._processes
    time.sleep(0.5)  # well into its wait for the gate
    os.kill(pid, signal.SIGKILL)
    gate.write_text("go")
    assert handoff.wait_for_hand_offs() == []
    assert recorded == ["go"] and RunRecord(tmp_path).status()["status"] == "ok"
    assert (
        "the worker process died (killed, or out of memory); probes is done here" in capsys.readouterr().out
    )
    handoff._worker = None  # the dead pool: the next hand-off starts a new worker


class SigtermAfterTheLastTestBatch(L.Callback):
    """Sends this process SIGTERM once the test's last batch is done (probes and figures follow)."""

    def on_test_epoch_end(self, trainer, pl_module) -> None:
        os.kill(os.getpid(), signal.SIGTERM)


def test_sigterm_while_testing_stops_the_run_and_records_it_interrupted(mnist_root, tmp_path):
    cfg = compose_train(
        [
            *LEAN,
            "debug=limit",
            "+callbacks.sigterm._target_=tests.test_run_status.SigtermAfterTheLastTestBatch",
        ],
        tmp_path,
        mnist_root,
    )
    with pytest.raises(SIGTERMException):
        train(cfg)
    status = RunRecord(tmp_path).status()
    assert status["status"] == "interrupted" and f"python train.py resume={tmp_path}" in status["error"]
    assert not (tmp_path / "metrics.json").exists()


def sweep_command(mnist_root: Path, sweep: Path, *overrides: str) -> list[str]:
    """A three-job sweep whose jobs hand their probes and figures to the worker."""
    return train_command(
        mnist_root,
        "debug=limit",
        "logger=tensorboard",
        f"hydra.sweep.dir={sweep}",
        "seed=0,1,2",
        *overrides,
        "-m",
    )


def children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:  # the process has ended
        return []


def command_line(pid: int) -> bytes:
    """A process's command line, empty once it has ended (a child may end between listing and reading)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def is_handoff_worker(pid: int) -> bool:
    line = command_line(pid)
    return b"multiprocessing" in line and b"resource_tracker" not in line


@pytest.mark.slow
def test_a_sweep_whose_worker_is_killed_still_has_every_result(mnist_root, tmp_path):
    """The worker SIGKILLed as soon as it starts, while it holds job 0's probes and figures: every
    job still ends ok with its probes and figures, and the sweep exits 0."""
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(
        sweep_command(mnist_root, sweep), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    killed, deadline = None, time.monotonic() + 300
    while killed is None and proc.poll() is None and time.monotonic() < deadline:
        workers = [c for c in children(proc.pid) if is_handoff_worker(c)]
        if workers:
            try:
                os.kill(workers[0], signal.SIGKILL)
                killed = workers[0]
            except ProcessLookupError:  # it ended between the listing and the kill: look again
                pass
        time.sleep(0.01)
    out, err = proc.communicate(timeout=600)
    assert killed is not None, err[-2000:]
    assert proc.returncode == 0, err[-3000:]
    assert "the worker process died" in out
    for job in ("0", "1", "2"):
        assert RunRecord(sweep / job).status() == {"status": "ok", "error": ""}, job
        assert all(0 < read_metrics(sweep / job)[p] <= 1 for p in PROBES), job
        assert {p.name for p in (sweep / job / "plots").glob("*.png")} == FIGURES, job


@pytest.mark.slow
def test_a_sweep_killed_while_its_worker_is_busy_is_completed_by_evaluate(mnist_root, tmp_path):
    """The whole sweep SIGKILLed after job 0 handed off its probes and figures: job 0 says what it
    lacks and how to complete it; evaluate.py sweep_dir= completes it as the job would have."""
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(
        sweep_command(mnist_root, sweep),
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    deadline = time.monotonic() + 300
    while RunRecord(sweep / "0").status().get("status") != "incomplete" and time.monotonic() < deadline:
        assert proc.poll() is None
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=60)
    status = RunRecord(sweep / "0").status()
    assert status["status"] == "incomplete" and status["missing"] == ["probes", "figures"]
    assert status["error"].endswith(f"complete them with: python evaluate.py sweep_dir={sweep.resolve()}")
    assert not set(PROBES) & set(read_metrics(sweep / "0"))

    done = subprocess.run(
        [sys.executable, str(ROOT / "evaluate.py"), f"sweep_dir={sweep}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "job 0: completed its probes, figures" in done.stdout
    assert RunRecord(sweep / "0").status() == {"status": "ok", "error": ""}
    metrics = read_metrics(sweep / "0")
    assert all(0 < metrics[p] <= 1 for p in PROBES)
    assert {p.name for p in (sweep / "0" / "plots").glob("*.png")} == FIGURES
    summary = (sweep / "summary.md").read_text()
    assert "| 0 | " in summary


@pytest.mark.slow
def test_sigterm_while_a_sweep_job_tests_ends_the_sweep_with_143(mnist_root, tmp_path):
    sweep = tmp_path / "sweep"
    sigterm = "+callbacks.sigterm._target_=tests.test_run_status.SigtermAfterTheLastTestBatch"
    proc = subprocess.run(
        sweep_command(mnist_root, sweep, sigterm), cwd=ROOT, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert RunRecord(sweep / "0").status()["status"] == "interrupted"
    assert not (sweep / "1").exists()  # the sweep stopped


@pytest.mark.parametrize(
    ("value", "recorded"),
    [
        (0.10000000149011612, 0.1),  # float32(0.1), as a setting logged through Lightning reads
        (0.0010000000474974513, 0.001),
        (0.3333333432674408, 0.33333334),  # float32(1/3): all the digits float32 has
        (0.1, 0.1),  # a float64 value keeps its digits
        (1 / 3, 1 / 3),
        (7, 7),
        (1e300, 1e300),  # beyond float32
    ],
)
def test_a_float32_value_is_recorded_as_its_shortest_decimal(tmp_path, value, recorded):
    from sae.run.record import RunRecord

    RunRecord(tmp_path).evaluated({"test/x": value})
    written = json.loads((tmp_path / "metrics.json").read_text())["test/x"]
    assert written == recorded and type(written) is type(recorded)
