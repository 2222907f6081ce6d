"""The GPU check's dry path: every step of benchmarks/gpu_check.py runs and its table is filled."""

import json
import subprocess
import sys

import pytest

from tests.conftest import QUICK_RUN, ROOT


@pytest.mark.slow
def test_gpu_check_dry_path_runs_every_step_and_fills_its_table(mnist_root, tmp_path):
    command = [
        sys.executable,
        "benchmarks/gpu_check.py",
        "--device",
        "cpu",
        "--tiny",
        "--data-root",
        str(mnist_root),
        "--budget",
        "850",
        "--log-dir",
        str(tmp_path),
    ]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("| figure | measured | target | met |") :].splitlines()[2:]
    rows = {cells[1].strip(): cells[2:] for cells in (row.split("|") for row in table if row.startswith("|"))}
    assert list(rows) == [
        "(a)/(c) per epoch",
        "default run fit/seconds",
        "default run fit/seconds, cuda_graph=false",
        "vectorized / single",
        "basic / vectorized",
        "test/mse, launchers apart",
        "CUDA tests failed",
        "step: fused Adam / eager",
        "step: CUDA graph / eager",
    ]
    for name, (measured, _, met, _) in list(rows.items())[:-2]:
        assert met.strip() in ("yes", "no", "-"), (name, proc.stdout[-4000:])  # measured, not failed
        assert float(measured) >= 0
    assert float(rows["step: fused Adam / eager"][0]) > 0  # measured; no target
    assert rows["step: CUDA graph / eager"][0].strip() == "-"  # CUDA only
    assert float(rows["CUDA tests failed"][0]) == 0  # skipped on a CPU: none failed
    assert "FAILED" not in proc.stdout
    logs = sorted(path.name for path in tmp_path.iterdir())
    assert logs == [
        "cuda_tests.log",
        "default_run.log",
        "default_run_eager.log",
        "epoch_time.log",
        "step_time.log",
        "sweep_time.log",
    ]


@pytest.mark.slow
def test_machinery_benchmark_turns_the_hand_off_off_and_the_run_still_ends_ok(mnist_root, tmp_path):
    """benchmarks/machinery.py's child mode: train.py with the hand-off worker off."""
    turned_off = "import sae.run.handoff as h; assert h.more_jobs_follow.__name__ == '<lambda>'"
    code = f"import benchmarks.machinery as b; b.turn_off('no_hand_off'); {turned_off}"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True).returncode == 0
    assert subprocess.run([sys.executable, "-c", turned_off], cwd=ROOT, capture_output=True).returncode != 0
    run = tmp_path / "run"
    command = [sys.executable, "benchmarks/machinery.py", "--child", "no_hand_off", "--"]
    command += [f"data.root={mnist_root}", *QUICK_RUN, "debug=limit", f"hydra.run.dir={run}"]
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((run / "status.json").read_text())["status"] == "ok"
